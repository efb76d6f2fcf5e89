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
            Caller::Site { site, role } => Access::Site { site, role },
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
