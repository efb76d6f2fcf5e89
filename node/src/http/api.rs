//! The HTTP API under `/v1` (JSON), plus `/healthz` and `/readyz`.
//!
//! Every handler checks its input before anything reaches the log: names, sizes and
//! counts are validated here (with the limit named in the error), so the state machine only
//! ever sees well-formed commands.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sesame_proto::api::{
    ChangeBody, ChangeOp, ChangesPage, CreateSite, CreateToken, Rollback, ScanPage, SiteDeleted,
    SiteInfo, SiteList, SiteStatus, TemplateProblem, TokenCreated, TokenInfo, TokenList,
    TokenRevoked, TupleBody, TxRequest, TxResponse, VersionInfo, VersionList,
};
use sesame_proto::command::{TOKENS_PER_SITE_MAX, TOKEN_TTL_S_MAX};
use sesame_proto::tuple::{TxError, CLIENT_SEQ_WINDOW, TX_BYTES_MAX};
use sesame_proto::{
    validate_collection, validate_key, validate_site, Command, CommandResult, LogIndex, Origin,
    Publish, Role, TokenRecord, Transaction, INDEX_MAX,
};
use sesame_sync::{SiteRecord, CHANGES_LIMIT_MAX, SCAN_LIMIT_MAX};

use crate::app::{now_ms, Node, HTTP_CONCURRENCY_MAX};
use crate::http::auth::{self, Caller};
use crate::http::error::ApiError;
use crate::reads::Consistency;

/// Largest request body. JSON spells bytes in base64 and escapes strings, so it allows more
/// than the encoded transaction limit; the transaction itself is checked after parsing.
pub const BODY_BYTES_MAX: usize = 2 * TX_BYTES_MAX;
const SCAN_LIMIT_DEFAULT: usize = 100;
const CHANGES_LIMIT_DEFAULT: usize = 1_000;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sync", get(sync_info))
        .route("/v1/rtc", post(crate::http::live::rtc))
        .route("/_sesame/live.js", get(crate::http::live::live_js))
        .route("/_sesame/sw.js", get(crate::http::live::sw_js))
        .route("/_sesame/post", post(crate::http::live::form_post))
        .route("/_sesame/manifest/{site}", get(crate::http::live::manifest))
        .route("/_sesame/blob/{site}/{hash}", get(crate::http::live::blob))
        .route("/v1/sites", post(create_site).get(list_sites))
        .route("/v1/sites/{site}", delete(delete_site))
        .route("/v1/sites/{site}/tx", post(write_tx))
        .route(
            "/v1/sites/{site}/tokens",
            post(create_token).get(list_tokens),
        )
        .route("/v1/sites/{site}/tokens/{id}", delete(revoke_token))
        .route("/v1/sites/{site}/tuples/{collection}", get(scan))
        .route(
            "/v1/sites/{site}/tuples/{collection}/{*key}",
            get(get_tuple),
        )
        .route("/v1/sites/{site}/changes", get(changes))
        .route("/v1/sites/{site}/status", get(status))
        .route("/v1/sites/{site}/rebuild", post(rebuild))
        .route("/v1/sites/{site}/compact", post(compact))
        .route("/v1/sites/{site}/export.zip", get(export_zip))
        .route("/v1/sites/{site}/versions", get(versions))
        .route("/v1/sites/{site}/rollback", post(rollback))
        .route("/v1/backup", get(backup))
        .route("/v1/auth/signup", post(crate::http::accounts::signup))
        .route("/v1/auth/login", post(crate::http::accounts::login))
        .route("/v1/auth/logout", post(crate::http::accounts::logout))
        .route("/v1/auth/session", get(crate::http::accounts::session))
        .route("/v1/sites/{site}/preview", post(preview))
        .route(
            "/_preview/{site}/{id}",
            get(crate::pages::preview::serve_root),
        )
        .route(
            "/_preview/{site}/{id}/",
            get(crate::pages::preview::serve_root),
        )
        .route(
            "/_preview/{site}/{id}/{*rest}",
            get(crate::pages::preview::serve),
        )
        .merge(crate::http::cluster::routes())
        .merge(crate::studio::routes())
        .route("/v1", any(api_not_found))
        .route("/v1/{*rest}", any(api_not_found))
        // A page of a site: what `front` does not send here already (a reserved first
        // segment that no route takes).
        .fallback(crate::pages::serve::serve)
        .with_state(node)
}

/// The service a node's HTTP listener runs: [`router`] behind [`crate::http::front`], which
/// sends pages past it.
pub fn front(node: Arc<Node>) -> crate::http::front::Front<Node> {
    crate::http::front::Front::new(node.clone(), router(node), HTTP_CONCURRENCY_MAX)
}

/// Site names that would shadow the node's own paths in path mode (`/<site>/...`).
pub const RESERVED_SITE_NAMES: [&str; 5] = ["v1", "healthz", "readyz", "metrics", "static"];

async fn api_not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Alive and able to work: 503 while Raft is stopped (a storage failure) and restarting.
async fn healthz(State(node): State<Arc<Node>>) -> Response {
    match node.raft.problem() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response(),
    }
}

/// The node's figures in the Prometheus (OpenMetrics) text format. Public, like `/healthz`:
/// it names no site, token or key.
async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let m = &node.metrics;
    let view = node.raft.view();
    m.raft_term.set(view.term as i64);
    m.raft_last_log_index.set(view.last_log_index as i64);
    m.raft_applied_index.set(node.reads.applied_index() as i64);
    m.raft_commit_index.set(node.reads.applied_index() as i64);
    m.raft_is_leader.set(i64::from(view.is_leader()));
    m.follower_lag.clear();
    let raft_metrics = node.raft.get().metrics().borrow().clone();
    if let Some(replication) = &raft_metrics.replication {
        let last = raft_metrics.last_log_index.unwrap_or(0);
        for (id, matched) in replication {
            if *id == node.id {
                continue;
            }
            let at = matched.as_ref().map_or(0, |l| l.index);
            m.follower_lag
                .get_or_create(&vec![("follower".to_string(), id.to_string())])
                .set(last.saturating_sub(at) as i64);
        }
    }
    m.client_connections.set(
        node.clients
            .connections
            .load(std::sync::atomic::Ordering::Relaxed) as i64,
    );
    m.client_sessions.set(node.feed.sessions() as i64);
    m.live_channels.set(node.live.channels() as i64);
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// Where and how app clients reach this node's QUIC sync endpoint, and which node leads (a
/// client follows the leader). Public: it holds no secret.
async fn sync_info(State(node): State<Arc<Node>>, headers: http::HeaderMap) -> Response {
    let mut info = serde_json::to_value(&node.sync_info).unwrap_or_default();
    if node.sync_info.quic.is_none() {
        // Bound to every address: the client reaches it at the host it used for HTTP.
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|a| {
                a.host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
        if let Some(host) = host {
            let quic = match host.parse::<std::net::Ipv6Addr>() {
                Ok(_) => format!("[{host}]:{}", node.sync_info.port),
                Err(_) => format!("{host}:{}", node.sync_info.port),
            };
            info["quic"] = serde_json::Value::String(quic);
        }
    }
    let view = node.raft.view();
    info["leader_http"] = match view.leader_member {
        Some(m) if !m.http.is_empty() => serde_json::Value::String(m.http),
        _ => serde_json::Value::Null,
    };
    Json(info).into_response()
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if let Some(problem) = node.raft.problem() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response();
    }
    let metrics = node.raft.get().metrics().borrow().clone();
    match (&metrics.running_state, metrics.current_leader) {
        (Ok(()), Some(leader)) => {
            (StatusCode::OK, format!("ready; leader is node {leader}\n")).into_response()
        }
        (Ok(()), None) => (StatusCode::SERVICE_UNAVAILABLE, "no leader yet\n").into_response(),
        (Err(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {e}\n"),
        )
            .into_response(),
    }
}

/// A JSON body read within [`BODY_BYTES_MAX`] and parsed strictly (unknown fields refused),
/// with errors in the API's format.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body()).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a request body: strict JSON, with a 400 that says what is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Checks a number that the store keeps as a signed 64-bit integer.
pub fn check_index(what: &str, value: u64) -> Result<u64, ApiError> {
    if value > INDEX_MAX {
        return Err(ApiError::bad_request(format!(
            "{what} {value} is over the maximum of {INDEX_MAX}"
        )));
    }
    Ok(value)
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, BODY_BYTES_MAX)
        .await
        .map_err(|_| {
            ApiError::too_large(format!(
                "request body is over the limit of {BODY_BYTES_MAX} bytes"
            ))
        })
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid path: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

fn check_site(site: &str) -> Result<(), ApiError> {
    validate_site(site).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Fails with 404 unless the site exists.
async fn require_site(node: &Node, site: &str) -> Result<SiteRecord, ApiError> {
    let name = site.to_string();
    node.read(move |v| v.site(&name))
        .await?
        .ok_or_else(|| ApiError::unknown_site(site))
}

fn site_info(r: SiteRecord) -> SiteInfo {
    SiteInfo {
        name: r.name,
        created_index: r.created_index,
        created_at_ms: r.created_at_ms,
    }
}

async fn create_site(
    State(node): State<Arc<Node>>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateSite>,
) -> Result<(StatusCode, Json<SiteInfo>), ApiError> {
    caller.require_admin()?;
    check_new_site(&req)?;
    let (index, result) = node
        .propose(Command::CreateSite {
            name: req.name.clone(),
            created_at_ms: now_ms(),
        })
        .await?;
    match result {
        CommandResult::SiteCreated => {
            let record = require_site(&node, &req.name).await?;
            debug_assert_eq!(record.created_index, index);
            Ok((StatusCode::CREATED, Json(site_info(record))))
        }
        CommandResult::SiteExists => Err(ApiError::new(
            StatusCode::CONFLICT,
            "site_exists",
            format!("site {:?} already exists", req.name),
        )),
        other => Err(ApiError::internal(format!(
            "create site {}: unexpected result {other:?}",
            req.name
        ))),
    }
}

/// Checks the body of `POST /v1/sites`.
pub fn check_new_site(req: &CreateSite) -> Result<(), ApiError> {
    check_site(&req.name)?;
    if RESERVED_SITE_NAMES.contains(&req.name.as_str()) {
        return Err(ApiError::bad_request(format!(
            "site name {:?} is reserved: it would shadow /{0}/ on the node; reserved names are {RESERVED_SITE_NAMES:?}",
            req.name
        )));
    }
    Ok(())
}

/// `DELETE /v1/sites/{site}` (admin): the site's tuples, tokens, versions and root go in one
/// command; its pages stop being served and projected. Its files stay in the object store
/// (see the README).
async fn delete_site(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<SiteDeleted>, ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require_admin()?;
    let (index, result) = node
        .propose(Command::DeleteSite {
            name: site.clone(),
            deleted_at_ms: now_ms(),
        })
        .await?;
    match result {
        CommandResult::SiteDeleted => {}
        CommandResult::UnknownSite { site } => return Err(ApiError::unknown_site(&site)),
        other => {
            return Err(ApiError::internal(format!(
                "delete site {site}: unexpected result {other:?}"
            )))
        }
    }
    node.pages.remove(&site, index);
    if let Err(e) = node.publisher.remove_root(&site).await {
        // The log says the site is gone; only edge readers still see the old root.
        tracing::warn!("remove the mirrored root of deleted site {site}: {e:#}");
    }
    Ok(Json(SiteDeleted { site, index }))
}

async fn list_sites(
    State(node): State<Arc<Node>>,
    caller: Caller,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<SiteList>, ApiError> {
    let params = query(q)?;
    ready(&node, params.consistency, params.min_index).await?;
    let sites = node.read(|v| v.sites()).await?;
    let sites = sites
        .into_iter()
        .filter(|s| caller.require_role(&s.name, Role::Reader).is_ok())
        .map(site_info)
        .collect();
    Ok(Json(SiteList { sites }))
}

/// When a token asked for with `ttl_s` expires, by the proposer's clock `now_ms`.
pub fn token_expiry(req: &CreateToken, now_ms: u64) -> Result<Option<u64>, ApiError> {
    match req.ttl_s {
        None => Ok(None),
        Some(ttl) if (1..=TOKEN_TTL_S_MAX).contains(&ttl) => {
            Ok(Some(now_ms.saturating_add(ttl * 1_000)))
        }
        Some(ttl) => Err(ApiError::bad_request(format!(
            "ttl_s {ttl} is out of range: a token lives 1 to {TOKEN_TTL_S_MAX} seconds, or omit ttl_s for no expiry"
        ))),
    }
}

/// A scoped token names at most [`SCOPES_PER_TOKEN_MAX`] valid scopes and reads or edits
/// inside them; owning part of a site means nothing.
fn check_scopes(req: &CreateToken) -> Result<(), ApiError> {
    if req.scopes.len() > sesame_proto::SCOPES_PER_TOKEN_MAX {
        return Err(ApiError::bad_request(format!(
            "{} scopes; a token carries at most {}",
            req.scopes.len(),
            sesame_proto::SCOPES_PER_TOKEN_MAX
        )));
    }
    if req.role == Role::Owner {
        return Err(ApiError::bad_request(
            "an owner token is for the whole site; a scoped token is a reader or an editor",
        ));
    }
    for (i, scope) in req.scopes.iter().enumerate() {
        scope
            .validate()
            .map_err(|e| ApiError::bad_request(format!("scope {i}: {e}")))?;
    }
    Ok(())
}

async fn create_token(
    State(node): State<Arc<Node>>,
    caller: Caller,
    site: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let site = path(site)?;
    check_site(&site)?;
    caller.require(&site, Role::Owner)?;
    let now = now_ms();
    let expires_at_ms = token_expiry(&req, now)?;
    require_site(&node, &site).await?;
    let token = auth::new_token();
    let record = TokenRecord {
        hash: auth::hash_token(&token),
        site: site.clone(),
        role: req.role,
        created_at_ms: now,
        expires_at_ms,
    };
    let command = if req.scopes.is_empty() {
        Command::PutToken(record)
    } else {
        check_scopes(&req)?;
        Command::PutScopedToken {
            token: record,
            scopes: req.scopes.clone(),
        }
    };
    let (index, result) = node.propose(command).await?;
    match result {
        CommandResult::TokenStored => Ok((
            StatusCode::CREATED,
            Json(TokenCreated {
                token,
                site,
                role: req.role,
                id: index,
                expires_at_ms,
            }),
        )),
        CommandResult::UnknownSite { site } => Err(ApiError::unknown_site(&site)),
        CommandResult::TooManyTokens => Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            format!(
                "site {site:?} has {TOKENS_PER_SITE_MAX} live tokens, the limit; revoke some \
                 (DELETE /v1/sites/{site}/tokens/{{id}}) first; nothing was created"
            ),
        )),
        other => Err(ApiError::internal(format!(
            "create token: unexpected result {other:?}"
        ))),
    }
}

async fn list_tokens(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<TokenList>, ApiError> {
    let site = path(p)?;
    let params = query(q)?;
    check_site(&site)?;
    caller.require(&site, Role::Owner)?;
    ready(&node, params.consistency, params.min_index).await?;
    require_site(&node, &site).await?;
    let rows = node.read(move |v| v.tokens(&site)).await?;
    let now = now_ms();
    let tokens = rows
        .into_iter()
        .map(|t| TokenInfo {
            id: t.id,
            role: t.role,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            expired: t.expires_at_ms.is_some_and(|at| at <= now),
            scopes: t.scopes,
        })
        .collect();
    Ok(Json(TokenList { tokens }))
}

async fn revoke_token(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<TokenRevoked>, ApiError> {
    let (site, id) = path(p)?;
    check_site(&site)?;
    let id: LogIndex = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "token id {id:?} is not a whole number; see GET /v1/sites/{site}/tokens"
        ))
    })?;
    check_index("token id", id)?;
    caller.require(&site, Role::Owner)?;
    let command = Command::RevokeToken {
        site: site.clone(),
        id,
        revoked_at_ms: now_ms(),
    };
    match node.propose(command).await?.1 {
        CommandResult::TokenRevoked => Ok(Json(TokenRevoked { id, revoked: true })),
        CommandResult::UnknownSite { site } => Err(ApiError::unknown_site(&site)),
        CommandResult::UnknownToken { id } => Err(ApiError::not_found(format!(
            "site {site:?} has no token {id} that is not revoked already"
        ))),
        other => Err(ApiError::internal(format!(
            "revoke token: unexpected result {other:?}"
        ))),
    }
}

/// Turns the body of `POST /v1/sites/{site}/tx` into a checked transaction, or the 4xx that
/// says why not.
pub fn transaction_from(site: &str, req: TxRequest) -> Result<Transaction, ApiError> {
    let origin = match (req.client_id, req.seq) {
        (Some(client_id), Some(seq)) => Some(Origin { client_id, seq }),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "client_id and seq go together: send both or neither",
            ))
        }
    };
    let tx = Transaction {
        site: site.to_string(),
        ops: req.ops,
        origin,
    };
    tx.validate().map_err(|e| match e {
        TxError::TooLarge { .. } | TxError::ValueTooLarge { .. } | TxError::TooManyOps { .. } => {
            ApiError::too_large(e.to_string())
        }
        _ => ApiError::bad_request(e.to_string()),
    })?;
    Ok(tx)
}

async fn write_tx(
    State(node): State<Arc<Node>>,
    caller: Caller,
    site: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<TxRequest>,
) -> Result<Json<TxResponse>, ApiError> {
    let site = path(site)?;
    check_site(&site)?;
    caller.require_role(&site, Role::Editor)?;
    let tx = transaction_from(&site, req)?;
    caller.require_ops(&site, &tx.ops)?;
    if let Err(wait) = node.limiter.check(&site, std::time::Instant::now()) {
        let rate = node.limiter.limit().map(|l| l.per_second).unwrap_or(0.0);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "site {site:?} is writing faster than its limit of {rate} transactions per second; \
                 nothing was written; retry after {secs} s; the site updates moments after a write lands"
            ),
        );
        e.retry_after = Some(secs);
        return Err(e);
    }
    // No existence pre-check: the state machine answers UnknownSite itself, and a read here
    // would cost every write a trip to the blocking pool.
    let (_, result) = node.write_tx(tx).await?;
    match result {
        CommandResult::Committed { index } => Ok(Json(TxResponse {
            index,
            duplicate: false,
        })),
        CommandResult::Duplicate { index } => Ok(Json(TxResponse {
            index,
            duplicate: true,
        })),
        CommandResult::StaleSeq { highest } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_seq",
            format!(
                "this client has applied seq {highest}; a lower seq is remembered only among \
                 its last {CLIENT_SEQ_WINDOW}, and this one is not: it is an old retry (its \
                 index is no longer known) or out of order; nothing was written"
            ),
        )),
        CommandResult::Conflict(c) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "op {}: {}/{} is at version {}, the op expected {}{}; nothing was written",
                c.op,
                c.collection,
                c.key,
                c.current,
                c.expected,
                if c.current == 0 {
                    " (0 means absent)"
                } else {
                    ""
                }
            ),
        )),
        CommandResult::UnknownSite { site } => Err(ApiError::unknown_site(&site)),
        other => Err(ApiError::internal(format!(
            "transaction: unexpected result {other:?}"
        ))),
    }
}

fn check_collection_key(collection: &str, key: Option<&str>) -> Result<(), ApiError> {
    validate_collection(collection).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(key) = key {
        validate_key(key).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(())
}

/// How fresh a read must be: `consistency=linearizable|lease|stale` (default
/// linearizable) and `min_index=N`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    consistency: Option<Consistency>,
    min_index: Option<u64>,
}

/// Waits until a read on this node may be made as fresh as asked.
async fn ready(
    node: &Node,
    consistency: Option<Consistency>,
    min_index: Option<u64>,
) -> Result<(), ApiError> {
    if let Some(n) = min_index {
        check_index("min_index", n)?;
    }
    node.gate
        .ready(consistency.unwrap_or_default(), min_index)
        .await
        .map_err(|e| {
            let mut api = ApiError::unavailable(e.to_string());
            api.retry_after = Some(1);
            api
        })
}

async fn get_tuple(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<(String, String, String)>, PathRejection>,
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<TupleBody>, ApiError> {
    let (site, collection, key) = path(p)?;
    let params = query(q)?;
    check_site(&site)?;
    check_collection_key(&collection, Some(&key))?;
    caller.require_read(&site, &collection, &key, true)?;
    ready(&node, params.consistency, params.min_index).await?;
    require_site(&node, &site).await?;
    let (c, k) = (collection.clone(), key.clone());
    let tuple = node.read(move |v| v.get(&site, &c, &k)).await?;
    let t = tuple.ok_or_else(|| ApiError::not_found(format!("no tuple {collection}/{key}")))?;
    Ok(Json(TupleBody {
        key: t.key,
        value: t.value,
        version: t.version,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanParams {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    after: Option<String>,
    consistency: Option<Consistency>,
    min_index: Option<u64>,
}

fn check_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit.unwrap_or(default) {
        0 => Err(ApiError::bad_request("limit must be at least 1")),
        n if n > max => Err(ApiError::bad_request(format!(
            "limit {n} is over the maximum of {max}"
        ))),
        n => Ok(n),
    }
}

async fn scan(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ScanParams>, QueryRejection>,
) -> Result<Json<ScanPage>, ApiError> {
    let (site, collection) = path(p)?;
    let params = query(q)?;
    check_site(&site)?;
    check_collection_key(&collection, None)?;
    caller.require_read(&site, &collection, &params.prefix, false)?;
    let limit = check_limit(params.limit, SCAN_LIMIT_DEFAULT, SCAN_LIMIT_MAX)?;
    ready(&node, params.consistency, params.min_index).await?;
    require_site(&node, &site).await?;
    let tuples = node
        .read(move |v| {
            v.scan(
                &site,
                &collection,
                &params.prefix,
                params.after.as_deref(),
                limit,
            )
        })
        .await?;
    let next = if tuples.len() == limit {
        tuples.last().map(|t| t.key.clone())
    } else {
        None
    };
    let tuples = tuples
        .into_iter()
        .map(|t| TupleBody {
            key: t.key,
            value: t.value,
            version: t.version,
        })
        .collect();
    Ok(Json(ScanPage { tuples, next }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesParams {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
    consistency: Option<Consistency>,
    min_index: Option<u64>,
}

async fn changes(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ChangesParams>, QueryRejection>,
) -> Result<Json<ChangesPage>, ApiError> {
    let site = path(p)?;
    let params = query(q)?;
    check_site(&site)?;
    caller.require(&site, Role::Reader)?;
    let limit = check_limit(params.limit, CHANGES_LIMIT_DEFAULT, CHANGES_LIMIT_MAX)?;
    check_index("since", params.since)?;
    ready(&node, params.consistency, params.min_index).await?;
    require_site(&node, &site).await?;
    let since = params.since;
    let (page, horizon) = node
        .read(move |v| {
            Ok((
                v.changes(Some(&site), since, limit)?,
                v.feed_horizon(&site)?,
            ))
        })
        .await?;
    if since > 0 && since < horizon {
        return Err(ApiError::new(
            StatusCode::GONE,
            "compacted",
            format!(
                "the change feed reaches back to index {horizon} only (older deletes were \
                 compacted away): read the collections whole, then follow changes from the \
                 index the read reflects"
            ),
        ));
    }
    let changes = page
        .changes
        .into_iter()
        .map(|c| ChangeBody {
            index: c.index,
            collection: c.collection,
            key: c.key,
            op: if c.value.is_some() {
                ChangeOp::Put
            } else {
                ChangeOp::Delete
            },
            value: c.value,
        })
        .collect();
    Ok(Json(ChangesPage {
        changes,
        next_since: page.next_since,
    }))
}

async fn status(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<SiteStatus>, ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require(&site, Role::Reader)?;
    let name = site.clone();
    let (record, root) = node
        .read(move |v| Ok((v.site(&name)?, v.root(&name)?)))
        .await?;
    if record.is_none() {
        return Err(ApiError::unknown_site(&site));
    }
    let committed = *node.applied().borrow();
    // The leader's projector knows; a follower reports what it serves.
    let projected = if node.projections.is_active() {
        node.projections.projected(&site)
    } else {
        node.pages.served_index(&site).unwrap_or(0)
    };
    let p = node.projections.status(&site).unwrap_or_default();
    let problem = |e: sesame_projector::TemplateError| TemplateProblem {
        template: e.template,
        line: e.line,
        message: e.message,
        path: e.path,
    };
    let purge = node.purger.as_ref().map(|purger| purger.status(&site));
    Ok(Json(SiteStatus {
        served_index: node.pages.served_index(&site),
        rolled_back: root.is_some_and(|r| r.rollback),
        site,
        committed_index: committed,
        projected_index: projected,
        pages: p.pages,
        pages_rendered_total: p.pages_rendered_total,
        pending: committed.saturating_sub(projected),
        last_publish_at: p.last_publish_at,
        last_publish_ms: p.last_publish_ms,
        last_error: p.last_error.map(problem),
        errors: p.errors.into_iter().map(problem).collect(),
        purge,
    }))
}

async fn rebuild(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require(&site, Role::Editor)?;
    require_site(&node, &site).await?;
    node.projections.request_rebuild(&site);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "site": site, "rebuild": "queued" })),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactRequest {
    /// Forget tombstones below this index (default: every one this node has applied).
    before: Option<u64>,
}

/// Compacts the site's change feed: its tombstones below `before` are forgotten (the
/// node also does this by itself past `pages::janitor::TOMBSTONES_KEEP`).
async fn compact(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require(&site, Role::Owner)?;
    // The body is optional: none compacts everything applied.
    let req: CompactRequest = if body.is_empty() {
        CompactRequest::default()
    } else {
        parse_json(&body)?
    };
    if let Some(b) = req.before {
        check_index("before", b)?;
    }
    let before = req.before.unwrap_or_else(|| node.reads.applied_index() + 1);
    let (index, result) = node
        .propose(Command::CompactFeed {
            site: site.clone(),
            before,
        })
        .await?;
    match result {
        CommandResult::FeedCompacted { removed, horizon } => Ok(Json(serde_json::json!({
            "site": site, "index": index, "removed": removed, "horizon": horizon
        }))),
        CommandResult::UnknownSite { site } => Err(ApiError::unknown_site(&site)),
        other => Err(ApiError::internal(format!("unexpected result {other:?}"))),
    }
}

/// The site's current version as a ZIP any static host can serve (`path/index.html` for
/// clean URLs, links made root-relative). Readers of the site may take it.
async fn export_zip(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require(&site, Role::Reader)?;
    require_site(&node, &site).await?;
    let manifest = node
        .pages
        .manifest(&site)
        .ok_or_else(|| ApiError::not_found(format!("site {site:?} has published nothing yet")))?;
    let base_url = node.projections.base_url(&site);
    let zip = crate::pages::export::site_zip(&node.pages, &manifest, &base_url)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    let disposition = format!("attachment; filename=\"{site}-{}.zip\"", manifest.index);
    Ok((
        [
            (http::header::CONTENT_TYPE, "application/zip".to_string()),
            (http::header::CONTENT_DISPOSITION, disposition),
        ],
        zip,
    )
        .into_response())
}

/// Renders the site at a proposed change and serves it under a private URL until it
/// expires (`crate::pages::preview`). Editors of the site may ask.
async fn preview(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<crate::pages::preview::PreviewRequest>,
) -> Result<Json<crate::pages::preview::PreviewBuilt>, ApiError> {
    use crate::pages::preview::{
        PreviewBusy, UnknownSite, PREVIEW_TTL_S_DEFAULT, PREVIEW_TTL_S_MAX,
    };
    let site = path(p)?;
    check_site(&site)?;
    caller.require_role(&site, Role::Editor)?;
    let ttl = req.ttl_s.unwrap_or(PREVIEW_TTL_S_DEFAULT);
    if ttl == 0 || ttl > PREVIEW_TTL_S_MAX {
        return Err(ApiError::bad_request(format!(
            "ttl_s is {ttl}; a preview lives 1 to {PREVIEW_TTL_S_MAX} seconds"
        )));
    }
    // The same checks as a transaction's, so a preview shows only what could commit.
    let tx = transaction_from(
        &site,
        TxRequest {
            ops: req.ops,
            client_id: None,
            seq: None,
        },
    )?;
    caller.require_ops(&site, &tx.ops)?;
    if tx
        .ops
        .iter()
        .any(|op| matches!(op, sesame_proto::Op::Send { .. }))
    {
        return Err(ApiError::bad_request(
            "a preview shows site data; mailbox sends are not site data",
        ));
    }
    require_site(&node, &site).await?;
    node.projections
        .preview(&site, tx.ops, std::time::Duration::from_secs(ttl))
        .await
        .map(Json)
        .map_err(|e| {
            if e.downcast_ref::<PreviewBusy>().is_some() {
                ApiError::unavailable(e.to_string())
            } else if let Some(UnknownSite(site)) = e.downcast_ref::<UnknownSite>() {
                ApiError::unknown_site(site)
            } else {
                ApiError::internal(format!("preview: {e:#}"))
            }
        })
}

/// Backups streaming at once from one node; each holds a store copy and keeps garbage
/// collection waiting.
const BACKUPS_CONCURRENT_MAX: usize = 2;
static BACKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BACKUPS_CONCURRENT_MAX);

/// An online backup of the whole node (admin): see `crate::backup` for the format.
async fn backup(State(node): State<Arc<Node>>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let permit = BACKUPS.try_acquire().map_err(|_| {
        ApiError::unavailable(format!(
            "{BACKUPS_CONCURRENT_MAX} backups are running on this node; retry when one ends"
        ))
    })?;
    let rx = crate::backup::stream(&node.data_dir, node.id, node.publisher.clone())
        .await
        .map_err(|e| ApiError::internal(format!("start the backup: {e:#}")))?;
    let body = futures::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        rx.recv().await.map(|chunk| (chunk, (rx, permit)))
    });
    Ok((
        [
            (
                http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"sesame-node-{}.backup\"", node.id),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

const VERSIONS_LIMIT_DEFAULT: usize = 100;
/// Longest a rollback waits for this node to serve the version it rolled back to.
const ROLLBACK_INSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const VERSIONS_LIMIT_MAX: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsParams {
    limit: Option<usize>,
    consistency: Option<Consistency>,
    min_index: Option<u64>,
}

async fn versions(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<VersionsParams>, QueryRejection>,
) -> Result<Json<VersionList>, ApiError> {
    let site = path(p)?;
    let params = query(q)?;
    check_site(&site)?;
    caller.require(&site, Role::Reader)?;
    let limit = check_limit(params.limit, VERSIONS_LIMIT_DEFAULT, VERSIONS_LIMIT_MAX)?;
    ready(&node, params.consistency, params.min_index).await?;
    require_site(&node, &site).await?;
    let (current, list) = node
        .read(move |v| Ok((v.root(&site)?, v.versions(&site, limit)?)))
        .await?;
    let current_log = current.map(|r| r.log_index);
    let versions = list
        .into_iter()
        .map(|r| VersionInfo {
            current: Some(r.log_index) == current_log,
            index: r.index,
            manifest: r.manifest,
            files: r.files,
            published_at_ms: r.published_at_ms,
            rollback: r.rollback,
        })
        .collect();
    Ok(Json(VersionList { versions }))
}

async fn rollback(
    State(node): State<Arc<Node>>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<Rollback>,
) -> Result<Json<VersionInfo>, ApiError> {
    let site = path(p)?;
    check_site(&site)?;
    caller.require(&site, Role::Editor)?;
    check_index("index", req.index)?;
    require_site(&node, &site).await?;
    let name = site.clone();
    let (target, current) = node
        .read(move |v| Ok((v.version_at(&name, req.index)?, v.root(&name)?)))
        .await?;
    let target = target.ok_or_else(|| {
        ApiError::not_found(format!(
            "site {site:?} has no published version at index {}; see its versions",
            req.index
        ))
    })?;
    let command = Command::Publish(Publish {
        site: site.clone(),
        manifest: target.manifest.clone(),
        index: target.index,
        files: target.files,
        published_at_ms: now_ms(),
        expected: current.map(|r| r.manifest),
        rollback: true,
    });
    let (root_log_index, result) = node.propose(command).await?;
    match result {
        CommandResult::Published => {}
        CommandResult::RootMoved { .. } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the site published a new version meanwhile; nothing was rolled back; retry",
            ))
        }
        CommandResult::VersionGone => {
            return Err(ApiError::not_found(format!(
                "the version at index {} left the history of site {site:?} meanwhile (see --history-keep); nothing was rolled back",
                req.index
            )))
        }
        other => {
            return Err(ApiError::internal(format!(
                "rollback: unexpected result {other:?}"
            )))
        }
    }
    // This node serves the rolled-back version once it has installed the new root.
    if !node
        .pages
        .wait_root(&site, root_log_index, ROLLBACK_INSTALL_WAIT)
        .await
    {
        tracing::warn!("site {site}: the rollback at log index {root_log_index} is committed but not served yet");
    }
    Ok(Json(VersionInfo {
        index: target.index,
        manifest: target.manifest,
        files: target.files,
        published_at_ms: now_ms(),
        rollback: true,
        current: true,
    }))
}
