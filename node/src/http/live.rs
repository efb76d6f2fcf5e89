//! `POST /v1/rtc` (WebRTC signalling for live pages) and the scripts pages load.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sesame_sync::server::Access;

use crate::app::Node;
use crate::http::api::JsonBody;
use crate::http::auth::{caller, Caller};
use crate::http::error::ApiError;
use crate::live::OfferError;

/// The browser's offer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    #[serde(rename = "type")]
    kind: String,
    sdp: String,
    /// The site whose pages the browser shows (a visitor gets its grant).
    site: String,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    #[serde(rename = "type")]
    kind: &'static str,
    sdp: String,
}

/// Answers an offer: with a bearer token the session has the token's rights; without one
/// it is a visitor of `site`.
pub async fn rtc(
    State(node): State<Arc<Node>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(offer): JsonBody<Offer>,
) -> Result<Json<Answer>, ApiError> {
    if offer.kind != "offer" {
        return Err(ApiError::bad_request(format!(
            "type must be \"offer\", not {:?}",
            offer.kind
        )));
    }
    sesame_proto::validate_site(&offer.site).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let access = if headers.contains_key(header::AUTHORIZATION) {
        match caller(&node, &headers).await? {
            Caller::Admin => Access::Admin,
            Caller::Site { site, role, scopes } => Access::Site { site, role, scopes },
        }
    } else {
        node.live.visitor(&offer.site).await.map_err(offer_error)?
    };
    let sdp = node
        .live
        .answer(offer.sdp, access, from)
        .await
        .map_err(offer_error)?;
    Ok(Json(Answer {
        kind: "answer",
        sdp,
    }))
}

fn offer_error(e: OfferError) -> ApiError {
    match e {
        OfferError::Bad(m) => ApiError::bad_request(m),
        OfferError::Busy(m) => {
            let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", m);
            e.retry_after = Some(5);
            e
        }
        OfferError::Failed(m) => ApiError::unavailable(m),
    }
}

/// Largest form post, in bytes.
const FORM_BYTES_MAX: usize = 8 << 10;

/// A visitor's post from a plain HTML form (no JavaScript): the same grant, size and rate
/// checks as a post over a data channel, then a redirect back to the page, held until the
/// page shows the post (`?_min=`).
pub async fn form_post(
    State(node): State<Arc<Node>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if body.len() > FORM_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a form post is at most {FORM_BYTES_MAX} bytes"),
        ));
    }
    let mut site = None;
    let mut collection = None;
    let mut prefix = String::new();
    let mut back = None;
    let mut fields = serde_json::Map::new();
    for (k, v) in form_urlencoded::parse(&body) {
        match k.as_ref() {
            "_site" => site = Some(v.into_owned()),
            "_collection" => collection = Some(v.into_owned()),
            "_prefix" => prefix = v.into_owned(),
            "_back" => back = Some(v.into_owned()),
            _ if k.starts_with('_') => {}
            _ => {
                fields.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
            }
        }
    }
    let (Some(site), Some(collection)) = (site, collection) else {
        return Err(ApiError::bad_request("a post names _site and _collection"));
    };
    sesame_proto::validate_site(&site).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Back to a page of this site only (a path, never another host).
    let back = back.unwrap_or_else(|| "/".into());
    if !back.starts_with('/') || back.starts_with("//") || back.contains('\\') {
        return Err(ApiError::bad_request("_back must be a path of the site"));
    }
    let Access::Visitor(grant) = node.live.visitor(&site).await.map_err(offer_error)? else {
        return Err(ApiError::internal("a visitor's access is a grant"));
    };
    let value = sesame_proto::Value::from_json(serde_json::Value::Object(fields))
        .map_err(ApiError::bad_request)?;
    let key = format!("{prefix}{}-{:08x}", crate::app::now_ms(), rand_u32());
    let tx = sesame_proto::Transaction {
        site: site.clone(),
        ops: vec![sesame_proto::Op::Put {
            collection,
            key,
            value,
            if_version: Some(0),
        }],
        origin: None,
    };
    tx.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    grant.check_post(&tx).map_err(ApiError::forbidden)?;
    node.live.take_post(from.ip(), grant.posts_per_minute)?;
    if let Err(wait) = node.limiter.check(&site, std::time::Instant::now()) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("site {site:?} is writing faster than its limit"),
        );
        e.retry_after = Some(wait.as_secs().max(1));
        return Err(e);
    }
    let (index, result) = node.write_tx(tx).await?;
    if !matches!(result, sesame_proto::CommandResult::Committed { .. }) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("not posted: {result:?}"),
        ));
    }
    let target = crate::pages::serve::site_and_path(node.pages.config(), &headers, "/");
    let path = if target.by_host && target.site == site {
        back
    } else {
        format!("/{site}{back}")
    };
    Ok((
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("{path}?_min={index}"))],
    )
        .into_response())
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("read the operating system's random source");
    u32::from_le_bytes(b)
}

/// The version `site` serves now, for the service worker: `{site, index, files: {path: {hash,
/// content_type}}}`. Public, as the pages are.
pub async fn manifest(
    State(node): State<Arc<Node>>,
    axum::extract::Path(site): axum::extract::Path<String>,
) -> Response {
    let Some(m) = node.pages.manifest(&site) else {
        return (
            StatusCode::NOT_FOUND,
            "no such site, or nothing published yet",
        )
            .into_response();
    };
    let files: serde_json::Map<String, serde_json::Value> = m
        .files
        .iter()
        .map(|(path, f)| {
            (
                path.clone(),
                serde_json::json!({ "hash": f.hash, "content_type": f.content_type }),
            )
        })
        .collect();
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Json(serde_json::json!({ "site": m.site, "index": m.index, "files": files })),
    )
        .into_response()
}

/// `?path=` of a blob request: the page the service worker wants the file for.
#[derive(Debug, serde::Deserialize)]
pub struct BlobQuery {
    path: Option<String>,
}

/// A file of `site` by hash (of the version served now, or an earlier one still in the
/// store): immutable, cacheable for good. Its content type is the served version's at
/// `?path=` when that path has this file, else `application/octet-stream` (never sniffed).
pub async fn blob(
    State(node): State<Arc<Node>>,
    axum::extract::Path((site, hash)): axum::extract::Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<BlobQuery>,
) -> Response {
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (
            StatusCode::BAD_REQUEST,
            "a blob is named by its blake3 hash",
        )
            .into_response();
    }
    match node.pages.blob(&site, &hash, query.path.as_deref()).await {
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
        Some(Err(e)) => {
            tracing::warn!("blob {site}/{hash}: {e:#}");
            (StatusCode::SERVICE_UNAVAILABLE, "cannot read it now").into_response()
        }
        Some(Ok((body, content_type))) => (
            [
                (header::CONTENT_TYPE, content_type),
                (
                    header::CACHE_CONTROL,
                    "public, max-age=31536000, immutable".to_string(),
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            ],
            body,
        )
            .into_response(),
    }
}

/// The live-pages script: plain JavaScript, no build step.
pub const LIVE_JS: &str = include_str!("../../static/live.js");
/// The service worker that moves a site's pages between versions as a whole.
pub const SW_JS: &str = include_str!("../../static/sw.js");

fn script(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

pub async fn live_js() -> Response {
    script(LIVE_JS)
}

pub async fn sw_js() -> Response {
    let mut r = script(SW_JS);
    // A service worker at /_sesame/sw.js may control the whole origin's pages.
    r.headers_mut().insert(
        "service-worker-allowed",
        header::HeaderValue::from_static("/"),
    );
    r
}
