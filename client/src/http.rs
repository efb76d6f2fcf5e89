//! A typed client for the node's HTTP API under `/v1`.

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

/// A connection to one node's HTTP API.
#[derive(Clone)]
pub struct Http {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Http {
    /// `base` is the node's URL, like `http://127.0.0.1:7700`.
    pub fn new(base: &str, token: Option<String>) -> Http {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .build()
            .expect("build an HTTP client with default TLS-free settings");
        Http {
            base: base.trim_end_matches('/').to_string(),
            token,
            client,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
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

    pub async fn tx(&self, site: &str, req: &TxRequest) -> Result<TxResponse, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sites/{}/tx", seg(site)),
            Some(req),
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
            Some(&CreateToken { role, ttl_s }),
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

    /// Sends a request and decodes a JSON answer; any non-2xx status becomes an error.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                status: status.as_u16(),
                body: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        Err(api_error(status, &bytes))
    }
}

fn api_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status: status.as_u16(),
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => ClientError::Unexpected {
            status: status.as_u16(),
            body: String::from_utf8_lossy(bytes).into(),
        },
    }
}
