//! A typed client for the node's HTTP API under `/v1`.
//!
//! A client may know several nodes of a cluster ([`Http::with_nodes`]). Any node takes any
//! request (followers forward writes to the leader), so the client only moves on when the
//! node it asked cannot help: it is unreachable, or answers 503 `not_leader` or
//! `unavailable` (nothing was done). It then asks the next node, after a short pause once
//! it has asked them all, for at most [`RETRY_ROUNDS_MAX`] rounds; an error body naming
//! the leader's URL sends it there first. A request that may have been applied (the
//! connection broke after sending, or 503 `outcome_unknown`) is sent again only when doing
//! so is harmless: reads, and transactions carrying `client_id` and `seq`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sesame_proto::api::{
    AddLearner, ChangesPage, ClusterStatus, CreateSite, CreateToken, ErrorBody, MemberId,
    MembershipChanged, Rollback, ScanPage, SiteDeleted, SiteInfo, SiteList, SiteStatus,
    TokenCreated, TokenList, TokenRevoked, TupleBody, TxRequest, TxResponse, VersionList,
};
use sesame_proto::{encode_segment as seg, LogIndex, Op, Role};
use thiserror::Error;

/// How long one request may take before the client gives up.
const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Most rounds over the known nodes one call makes before it returns the last error.
pub const RETRY_ROUNDS_MAX: u32 = 3;
/// The pause after the first round that failed; it doubles after each further round.
const RETRY_PAUSE_MS_MIN: u64 = 100;
/// Most nodes a client is given.
pub const NODES_MAX: usize = 64;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The node answered with an error body.
    #[error("{status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the node: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("unexpected answer from the node ({status}): {body}")]
    Unexpected { status: u16, body: String },
}

impl ClientError {
    /// The API error code (`conflict`, `not_found`, ...), if the node sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Whether a request may be sent again when it may already have been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Applying it twice is harmless: a read, or a transaction with `client_id` and `seq`.
    Idempotent,
    /// Only when it certainly was not applied: not sent, or refused before anything was done.
    IfNotApplied,
}

/// What one try of a request came to, and where to try next.
struct Failure {
    error: ClientError,
    /// Another node may do what this one could not.
    retry: bool,
    /// The leader's URL, when the answer named it.
    leader: Option<String>,
}

/// A connection to a node's HTTP API, or to any of several nodes of one cluster.
#[derive(Clone)]
pub struct Http {
    /// Base URLs without a trailing slash; never empty.
    nodes: Arc<[String]>,
    /// The node that answered last: the first one asked next time.
    preferred: Arc<AtomicUsize>,
    token: Option<String>,
    client: reqwest::Client,
}

impl Http {
    /// `base` is the node's URL, like `http://127.0.0.1:7700`. A client of one node tries
    /// each request once: it has nowhere else to go.
    pub fn new(base: &str, token: Option<String>) -> Http {
        Http::with_nodes([base], token)
    }

    /// A client of several nodes of one cluster (base URLs like `http://10.0.0.1:7700`);
    /// see the module documentation for when it moves from one to the next.
    ///
    /// # Panics
    /// When `nodes` is empty or has more than [`NODES_MAX`] URLs.
    pub fn with_nodes<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
        token: Option<String>,
    ) -> Http {
        let nodes: Arc<[String]> = nodes
            .into_iter()
            .map(|n| n.as_ref().trim().trim_end_matches('/').to_string())
            .collect();
        assert!(!nodes.is_empty(), "an HTTP client needs a node URL");
        assert!(
            nodes.len() <= NODES_MAX,
            "an HTTP client takes at most {NODES_MAX} node URLs, not {}",
            nodes.len()
        );
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .build()
            .expect("build an HTTP client with default TLS-free settings");
        Http {
            nodes,
            preferred: Arc::new(AtomicUsize::new(0)),
            token,
            client,
        }
    }

    /// The URL of the node asked first: the one that answered last.
    pub fn base(&self) -> &str {
        &self.nodes[self.preferred.load(Ordering::Relaxed) % self.nodes.len()]
    }

    /// Every node URL this client knows, in the order given.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub async fn create_site(&self, name: &str) -> Result<SiteInfo, ClientError> {
        self.call(
            Method::POST,
            "/v1/sites",
            Some(&CreateSite { name: name.into() }),
        )
        .await
    }

    pub async fn list_sites(&self) -> Result<SiteList, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/sites", None).await
    }

    /// Commits a transaction. With `client_id` and `seq` it is applied at most once, so it
    /// is sent again (to another node) even when an earlier try may have been applied.
    pub async fn tx(&self, site: &str, req: &TxRequest) -> Result<TxResponse, ClientError> {
        let resend = if req.client_id.is_some() && req.seq.is_some() {
            Resend::Idempotent
        } else {
            Resend::IfNotApplied
        };
        self.send(
            Method::POST,
            &format!("/v1/sites/{}/tx", seg(site)),
            Some(req),
            resend,
        )
        .await
    }

    /// One put in its own transaction.
    pub async fn put(
        &self,
        site: &str,
        collection: &str,
        key: &str,
        value: serde_json::Value,
        if_version: Option<LogIndex>,
    ) -> Result<TxResponse, ClientError> {
        let value = sesame_proto::Value::from_json(value).map_err(|m| ClientError::Api {
            status: 400,
            code: "bad_request".into(),
            message: m,
        })?;
        let op = Op::Put {
            collection: collection.into(),
            key: key.into(),
            value,
            if_version,
        };
        self.one_op(site, op).await
    }

    pub async fn delete(
        &self,
        site: &str,
        collection: &str,
        key: &str,
        if_version: Option<LogIndex>,
    ) -> Result<TxResponse, ClientError> {
        let op = Op::Delete {
            collection: collection.into(),
            key: key.into(),
            if_version,
        };
        self.one_op(site, op).await
    }

    /// One op in a transaction of its own.
    async fn one_op(&self, site: &str, op: Op) -> Result<TxResponse, ClientError> {
        let req = TxRequest {
            ops: vec![op],
            client_id: None,
            seq: None,
        };
        self.tx(site, &req).await
    }

    pub async fn get(
        &self,
        site: &str,
        collection: &str,
        key: &str,
    ) -> Result<TupleBody, ClientError> {
        let path = format!(
            "/v1/sites/{}/tuples/{}/{}",
            seg(site),
            seg(collection),
            seg(key)
        );
        self.call::<(), _>(Method::GET, &path, None).await
    }

    /// One tuple, read as fresh as `consistency` (`linearizable`, `lease` or `stale`) says,
    /// and no older than `min_index`.
    pub async fn get_with(
        &self,
        site: &str,
        collection: &str,
        key: &str,
        consistency: &str,
        min_index: Option<LogIndex>,
    ) -> Result<TupleBody, ClientError> {
        let mut path = format!(
            "/v1/sites/{}/tuples/{}/{}?consistency={}",
            seg(site),
            seg(collection),
            seg(key),
            seg(consistency)
        );
        if let Some(n) = min_index {
            path.push_str(&format!("&min_index={n}"));
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn scan(
        &self,
        site: &str,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, ClientError> {
        let mut path = format!(
            "/v1/sites/{}/tuples/{}?prefix={}&limit={limit}",
            seg(site),
            seg(collection),
            seg(prefix)
        );
        if let Some(after) = after {
            path.push_str(&format!("&after={}", seg(after)));
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn changes(
        &self,
        site: &str,
        since: LogIndex,
        limit: usize,
    ) -> Result<ChangesPage, ClientError> {
        let path = format!(
            "/v1/sites/{}/changes?since={since}&limit={limit}",
            seg(site)
        );
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn create_token(&self, site: &str, role: Role) -> Result<TokenCreated, ClientError> {
        self.create_token_for(site, role, None).await
    }

    /// A token that expires `ttl_s` seconds from now (`None`: never).
    pub async fn create_token_for(
        &self,
        site: &str,
        role: Role,
        ttl_s: Option<u64>,
    ) -> Result<TokenCreated, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sites/{}/tokens", seg(site)),
            Some(&CreateToken {
                role,
                ttl_s,
                scopes: Vec::new(),
            }),
        )
        .await
    }

    /// A token limited to `scopes` (the parts of the site it may read and write).
    pub async fn create_scoped_token(
        &self,
        site: &str,
        role: Role,
        ttl_s: Option<u64>,
        scopes: Vec<sesame_proto::Scope>,
    ) -> Result<TokenCreated, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sites/{}/tokens", seg(site)),
            Some(&CreateToken {
                role,
                ttl_s,
                scopes,
            }),
        )
        .await
    }

    /// The site's tokens that are not revoked: ids, roles and times, never secrets.
    pub async fn list_tokens(&self, site: &str) -> Result<TokenList, ClientError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/sites/{}/tokens", seg(site)),
            None,
        )
        .await
    }

    pub async fn revoke_token(
        &self,
        site: &str,
        id: LogIndex,
    ) -> Result<TokenRevoked, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/sites/{}/tokens/{id}", seg(site)),
            None,
        )
        .await
    }

    /// Deletes a site and all its data (admin).
    pub async fn delete_site(&self, site: &str) -> Result<SiteDeleted, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/sites/{}", seg(site)), None)
            .await
    }

    pub async fn status(&self, site: &str) -> Result<SiteStatus, ClientError> {
        self.call::<(), _>(
            Method::GET,
            &format!("/v1/sites/{}/status", seg(site)),
            None,
        )
        .await
    }

    pub async fn rebuild(&self, site: &str) -> Result<serde_json::Value, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/sites/{}/rebuild", seg(site)),
            None,
        )
        .await
    }

    /// The site's current version as a ZIP (bytes).
    pub async fn export_zip(&self, site: &str) -> Result<Vec<u8>, ClientError> {
        self.get_bytes(&format!("/v1/sites/{}/export.zip", seg(site)))
            .await
    }

    /// Compacts the site's change feed below `before` (default: everything applied).
    pub async fn compact(
        &self,
        site: &str,
        before: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "before": before });
        self.call(
            Method::POST,
            &format!("/v1/sites/{}/compact", seg(site)),
            Some(&body),
        )
        .await
    }

    pub async fn versions(&self, site: &str, limit: usize) -> Result<VersionList, ClientError> {
        let path = format!("/v1/sites/{}/versions?limit={limit}", seg(site));
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn rollback(
        &self,
        site: &str,
        index: LogIndex,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/v1/sites/{}/rollback", seg(site));
        self.call(Method::POST, &path, Some(&Rollback { index }))
            .await
    }

    /// Renders the site at `ops` (not committed) and publishes it under a private preview
    /// URL that expires after `ttl_s` seconds (the node's default when `None`). Answers
    /// `{url, id, index, expires_at_ms, pages, errors}`.
    pub async fn preview(
        &self,
        site: &str,
        ops: &[sesame_proto::Op],
        ttl_s: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/v1/sites/{}/preview", seg(site));
        let body = serde_json::json!({ "ops": ops, "ttl_s": ttl_s });
        self.call(Method::POST, &path, Some(&body)).await
    }

    /// Who leads the cluster, and every member's progress (admin).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/cluster", None).await
    }

    /// Adds node `id` (cluster address `raft`, HTTP URL `http`) as a learner (admin).
    pub async fn add_learner(
        &self,
        id: u64,
        raft: &str,
        http: &str,
    ) -> Result<MembershipChanged, ClientError> {
        let body = AddLearner {
            id,
            raft: raft.into(),
            http: http.into(),
        };
        self.call(Method::POST, "/v1/cluster/learners", Some(&body))
            .await
    }

    /// Makes learner `id` a voter (admin).
    pub async fn promote(&self, id: u64) -> Result<MembershipChanged, ClientError> {
        self.call(Method::POST, "/v1/cluster/voters", Some(&MemberId { id }))
            .await
    }

    /// Takes node `id` out of the cluster (admin).
    pub async fn remove_member(&self, id: u64) -> Result<MembershipChanged, ClientError> {
        self.call(Method::POST, "/v1/cluster/remove", Some(&MemberId { id }))
            .await
    }

    /// Every key of a collection, following the scan cursor page by page.
    pub async fn keys(&self, site: &str, collection: &str) -> Result<Vec<String>, ClientError> {
        const PAGE: usize = 1_000;
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .scan(site, collection, "", after.as_deref(), PAGE)
                .await?;
            keys.extend(page.tuples.into_iter().map(|t| t.key));
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Sends a request and decodes a JSON answer; any non-2xx status becomes an error. A
    /// read (`GET`) is sent again wherever it may help; anything else only where it
    /// certainly was not applied.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let resend = if method == Method::GET || method == Method::HEAD {
            Resend::Idempotent
        } else {
            Resend::IfNotApplied
        };
        self.send(method, path, body, resend).await
    }

    /// A `GET` whose answer is bytes, not JSON (a ZIP), from the preferred node.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let base = &self.nodes[self.preferred.load(Ordering::Relaxed) % self.nodes.len()];
        let mut req = self.client.get(format!("{base}{path}"));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(ClientError::Transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(ClientError::Transport)?;
        if status.is_success() {
            Ok(bytes.to_vec())
        } else {
            Err(api_error(status, &bytes).0)
        }
    }

    /// Tries the nodes in turn, from the preferred one, until one answers or the rounds
    /// run out (see the module documentation).
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        resend: Resend,
    ) -> Result<T, ClientError> {
        let count = self.nodes.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        // One node: nowhere else to go, but for a leader it names.
        let rounds = if count == 1 { 1 } else { RETRY_ROUNDS_MAX };
        let mut pause = Duration::from_millis(RETRY_PAUSE_MS_MIN);
        let mut last = None;
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let mut step = 0;
            let mut hinted: Option<String> = None;
            // Leaders named per round, so two nodes naming each other cannot loop.
            let mut hops = 0;
            while step < count || hinted.is_some() {
                // A leader named by the previous answer goes before the next node in turn.
                let (url, index) = match hinted.take() {
                    Some(url) => {
                        hops += 1;
                        let index = self.nodes.iter().position(|n| *n == url);
                        (url, index)
                    }
                    None => {
                        let i = (first + step) % count;
                        step += 1;
                        (self.nodes[i].clone(), Some(i))
                    }
                };
                match self.attempt(&url, method.clone(), path, body, resend).await {
                    Ok(answer) => {
                        if let Some(i) = index {
                            self.preferred.store(i, Ordering::Relaxed);
                        }
                        return Ok(answer);
                    }
                    Err(failure) if !failure.retry => return Err(failure.error),
                    Err(failure) => {
                        hinted = failure
                            .leader
                            .filter(|leader| *leader != url && hops < count);
                        last = Some(failure.error);
                    }
                }
            }
        }
        Err(last.expect("every round tries at least one node"))
    }

    /// One try of a request at one node.
    async fn attempt<B: Serialize, T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<&B>,
        resend: Resend,
    ) -> Result<T, Failure> {
        let mut req = self.client.request(method, format!("{base}{path}"));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        // Not connected: nothing was sent. Broken later: it may have been applied.
        let transport = |e: reqwest::Error| Failure {
            retry: e.is_connect() || resend == Resend::Idempotent,
            error: ClientError::Transport(e),
            leader: None,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Failure {
                error: ClientError::Unexpected {
                    status: status.as_u16(),
                    body: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
                },
                retry: false,
                leader: None,
            });
        }
        let (error, leader) = api_error(status, &bytes);
        let retry = status == StatusCode::SERVICE_UNAVAILABLE
            && match error.code() {
                Some("not_leader" | "unavailable") => true,
                Some("outcome_unknown") => resend == Resend::Idempotent,
                _ => false,
            };
        Err(Failure {
            error,
            retry,
            leader,
        })
    }
}

/// The error an answer's body describes, and the leader's URL if it names one.
fn api_error(status: StatusCode, bytes: &[u8]) -> (ClientError, Option<String>) {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => (
            ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            },
            body.error
                .leader
                .map(|l| l.trim_end_matches('/').to_string())
                .filter(|l| l.starts_with("http://") || l.starts_with("https://")),
        ),
        Err(_) => (
            ClientError::Unexpected {
                status: status.as_u16(),
                body: String::from_utf8_lossy(bytes).into(),
            },
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use serde_json::json;
    use sesame_proto::api::TxRequest;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A node stand-in that gives every request the same answer, and counts them.
    struct Fake {
        url: String,
        hits: Arc<AtomicUsize>,
    }

    impl Fake {
        async fn answering(status: u16, body: serde_json::Value) -> Fake {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            Fake::on(listener, status, body)
        }

        fn on(listener: tokio::net::TcpListener, status: u16, body: serde_json::Value) -> Fake {
            let url = format!("http://{}", listener.local_addr().unwrap());
            let hits = Arc::new(AtomicUsize::new(0));
            let counter = hits.clone();
            let body = body.to_string();
            tokio::spawn(async move {
                loop {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = body.clone();
                    tokio::spawn(async move {
                        read_request(&mut conn).await;
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        conn.write_all(answer.as_bytes()).await.unwrap();
                    });
                }
            });
            Fake { url, hits }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    /// Reads a request's head and its `content-length` body.
    async fn read_request(conn: &mut tokio::net::TcpStream) {
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before sending a request");
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if raw.len() >= end + 4 + length {
                    return;
                }
            }
        }
    }

    /// A URL nothing listens at: connecting is refused.
    fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    fn error(code: &str, leader: Option<&str>) -> serde_json::Value {
        json!({ "error": { "code": code, "message": "m", "leader": leader } })
    }

    fn tx(client_id: Option<&str>, seq: Option<u64>) -> TxRequest {
        TxRequest {
            ops: Vec::new(),
            client_id: client_id.map(str::to_string),
            seq,
        }
    }

    const SITES: &str = r#"{"sites": []}"#;

    #[tokio::test]
    async fn a_dead_node_first_in_the_list_is_passed_over_and_the_next_one_kept() {
        let live = Fake::answering(200, serde_json::from_str(SITES).unwrap()).await;
        let client = Http::with_nodes([dead_url(), live.url.clone()], None);
        client.list_sites().await.unwrap();
        assert_eq!(client.base(), live.url);
        // A write that was never sent anywhere is safe to send to the next node too.
        let ok = Fake::answering(200, json!({"index": 3, "duplicate": false})).await;
        let writer = Http::with_nodes([dead_url(), ok.url.clone()], None);
        assert_eq!(writer.tx("s", &tx(None, None)).await.unwrap().index, 3);
        assert_eq!(ok.hits(), 1);
    }

    #[tokio::test]
    async fn not_leader_moves_on_and_a_named_leader_is_asked_first() {
        let leader = Fake::answering(200, serde_json::from_str(SITES).unwrap()).await;
        let follower = Fake::answering(503, error("not_leader", Some(&leader.url))).await;
        let other = Fake::answering(200, serde_json::from_str(SITES).unwrap()).await;
        let client = Http::with_nodes([&follower.url, &other.url, &leader.url], None);
        client.list_sites().await.unwrap();
        assert_eq!((follower.hits(), other.hits(), leader.hits()), (1, 0, 1));
        assert_eq!(client.base(), leader.url);
        // A client of one node follows a named leader too.
        let single = Http::new(&follower.url, None);
        single.list_sites().await.unwrap();
        assert_eq!(leader.hits(), 2);
    }

    #[tokio::test]
    async fn a_write_that_may_have_been_applied_is_resent_only_with_client_id_and_seq() {
        let unknown = Fake::answering(503, error("outcome_unknown", None)).await;
        let next = Fake::answering(200, json!({"index": 5, "duplicate": true})).await;
        let client = Http::with_nodes([&unknown.url, &next.url], None);
        let err = client.tx("s", &tx(None, None)).await.unwrap_err();
        assert_eq!(err.code(), Some("outcome_unknown"));
        assert_eq!(next.hits(), 0);
        let err = client.tx("s", &tx(Some("c"), None)).await.unwrap_err();
        assert_eq!(err.code(), Some("outcome_unknown"));
        assert_eq!(next.hits(), 0);
        let resp = client.tx("s", &tx(Some("c"), Some(1))).await.unwrap();
        assert_eq!((resp.index, resp.duplicate), (5, true));
        assert_eq!(next.hits(), 1);
    }

    #[tokio::test]
    async fn answers_that_another_node_would_repeat_are_returned_at_once() {
        let conflict = Fake::answering(409, error("conflict", None)).await;
        let next = Fake::answering(200, serde_json::from_str(SITES).unwrap()).await;
        let client = Http::with_nodes([&conflict.url, &next.url], None);
        let err = client.tx("s", &tx(Some("c"), Some(1))).await.unwrap_err();
        assert_eq!(err.code(), Some("conflict"));
        assert_eq!((conflict.hits(), next.hits()), (1, 0));
        // One node, not leading and naming no leader: asked once.
        let busy = Fake::answering(503, error("not_leader", None)).await;
        let err = Http::new(&busy.url, None).list_sites().await.unwrap_err();
        assert_eq!(err.code(), Some("not_leader"));
        assert_eq!(busy.hits(), 1);
    }

    #[tokio::test]
    async fn nodes_that_cannot_help_are_tried_a_bounded_number_of_rounds() {
        let busy = Fake::answering(503, error("unavailable", None)).await;
        let client = Http::with_nodes([dead_url(), busy.url.clone()], None);
        let started = std::time::Instant::now();
        let err = client.list_sites().await.unwrap_err();
        assert_eq!(err.code(), Some("unavailable"));
        assert_eq!(busy.hits(), RETRY_ROUNDS_MAX as usize);
        assert!(started.elapsed() < Duration::from_secs(5), "{started:?}");
    }

    #[tokio::test]
    async fn two_nodes_naming_each_other_do_not_loop() {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (la, lb) = (bind().await.unwrap(), bind().await.unwrap());
        let url = |l: &tokio::net::TcpListener| format!("http://{}", l.local_addr().unwrap());
        let (ua, ub) = (url(&la), url(&lb));
        let a = Fake::on(la, 503, error("not_leader", Some(&ub)));
        let b = Fake::on(lb, 503, error("not_leader", Some(&ua)));
        let client = Http::with_nodes([&ua, &ub], None);
        assert_eq!(
            client.list_sites().await.unwrap_err().code(),
            Some("not_leader")
        );
        // Per round: each node in turn, and at most one named leader per node.
        let most = 2 * 2 * RETRY_ROUNDS_MAX as usize;
        assert!(a.hits() + b.hits() <= most, "{} + {}", a.hits(), b.hits());
    }
}
