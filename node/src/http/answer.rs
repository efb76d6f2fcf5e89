//! What every HTTP request and response of a node passes through, around routing (the
//! node's [`Frontend`](crate::http::front::Frontend), which [`crate::http::front`] runs):
//! limits on the request target and headers answered in the API's error format, that
//! format for the answers axum makes without a body (405 from method routing), and the
//! headers every response carries.
//!
//! hyper has limits of its own further out (a request target of 64 KiB, 100 headers, a
//! request head of about 408 KiB); past those hyper answers 414, 431 or 400 itself, with an
//! empty body, before any of this runs. The limits here sit below hyper's so that what a
//! client meets first is a JSON error that names the limit.

use std::future::Future;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::http::error::ApiError;

/// Longest request target (path and query), in bytes.
pub const URI_BYTES_MAX: usize = 8 * 1024;
/// Most request headers.
pub const HEADERS_MAX: usize = 64;
/// Largest sum of request header names and values, in bytes.
pub const HEADER_BYTES_MAX: usize = 32 * 1024;

/// The request path as logged: a preview's id is its key, so it is left out.
struct LoggablePath<'a>(&'a str);

impl std::fmt::Display for LoggablePath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.strip_prefix("/_preview/") {
            Some(rest) => match rest.split_once('/') {
                Some((site, _)) => write!(f, "/_preview/{site}/(id)"),
                None => f.write_str("/_preview/(id)"),
            },
            None => f.write_str(self.0),
        }
    }
}

/// What a node keeps of a request until its answer is finished.
pub struct Ticket {
    request_id: HeaderValue,
    method: http::Method,
    /// The request's URI (cheap to keep: its parts share the request's buffer).
    uri: http::Uri,
    span: tracing::Span,
    started: std::time::Instant,
}

/// A node's answers: pages through [`crate::pages::serve`], and around every answer a
/// request id (`X-Request-Id`, also on every line logged meanwhile; never a header or a
/// body: tokens stay out of the log), `nosniff`, the count by status, the API's JSON error
/// body where axum answered without one, and a log line.
impl crate::http::front::Frontend for crate::app::Node {
    type Ticket = Ticket;

    /// An API request is answered in a span that names it, so every line logged meanwhile
    /// carries its request id. A page gets none: with the node's default filter a span
    /// cost more than the rest of a page's answer (about 4 µs of the 15 µs of CPU a
    /// request takes), and a page logs nothing on its way unless something failed; then
    /// its error names the site and path, and its answer's line the request id.
    fn begin(&self, req: &Request, page: bool) -> Ticket {
        let request_id = request_id(req.headers());
        let method = req.method().clone();
        let uri = req.uri().clone();
        let span = if page {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "http",
                request_id = %RequestIdField(&request_id),
                %method,
                path = %LoggablePath(uri.path()),
            )
        };
        Ticket {
            request_id,
            method,
            uri,
            span,
            started: std::time::Instant::now(),
        }
    }

    fn span(ticket: &Ticket) -> tracing::Span {
        ticket.span.clone()
    }

    fn page(self: std::sync::Arc<Self>, req: Request) -> impl Future<Output = Response> + Send {
        crate::pages::serve::serve_request(self, req)
    }

    fn finish(&self, ticket: Ticket, resp: Response) -> Response {
        let path = ticket.uri.path();
        let mut resp = fill_empty_error(resp, &ticket.method, LoggablePath(path));
        let (status, failed) = (resp.status().as_u16(), resp.status().is_server_error());
        let ms = ticket.started.elapsed().as_secs_f64() * 1e3;
        if ticket.span.is_none() {
            // A page (see `begin`): the line names the request itself.
            let (id, method) = (RequestIdField(&ticket.request_id), &ticket.method);
            if failed {
                tracing::warn!(request_id = %id, %method, path = %LoggablePath(path), status, ms, "answered");
            } else {
                tracing::debug!(request_id = %id, %method, path = %LoggablePath(path), status, ms, "answered");
            }
        } else {
            ticket.span.in_scope(|| {
                if failed {
                    tracing::warn!(status, ms, "answered");
                } else {
                    tracing::debug!(status, ms, "answered");
                }
            });
        }
        resp.headers_mut().insert(REQUEST_ID, ticket.request_id);
        resp.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        let status = resp.status();
        self.metrics.answered(status.as_u16());
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.rate_limited.inc();
        }
        if status.is_client_error() && crate::studio::is_write_path(&ticket.method, path) {
            self.rejections
                .record(&ticket.method, &LoggablePath(path).to_string(), status);
        }
        resp
    }
}

/// A request id as a log field.
struct RequestIdField<'a>(&'a HeaderValue);

impl std::fmt::Display for RequestIdField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids are checked or made to be `[A-Za-z0-9._-]`.
        f.write_str(self.0.to_str().unwrap_or("?"))
    }
}

/// The header that carries a request's id, both ways.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The id a request is logged under: the caller's `X-Request-Id` when it is a sane one (up
/// to 64 characters of `[A-Za-z0-9._-]`), else a new one.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let given = headers.get(REQUEST_ID).filter(|v| {
        let v = v.as_bytes();
        !v.is_empty()
            && v.len() <= 64
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    match given {
        Some(id) => id.clone(),
        None => {
            static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
            let pid = *PID.get_or_init(std::process::id);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("{pid:08x}-{n}");
            HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
                .expect("a made id is a valid header value")
        }
    }
}

/// Checks the request line and headers against the limits.
pub(crate) fn check_head(req: &Request) -> Result<(), ApiError> {
    let uri = req.uri();
    let uri_bytes = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, str::len);
    if uri_bytes > URI_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {uri_bytes} bytes, the limit is {URI_BYTES_MAX}"),
        ));
    }
    let headers = req.headers();
    if headers.len() > HEADERS_MAX {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} headers, the limit is {HEADERS_MAX}",
                headers.len()
            ),
        ));
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > HEADER_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request headers are {header_bytes} bytes, the limit is {HEADER_BYTES_MAX}"
            ),
        ));
    }
    Ok(())
}

/// Gives an error answer without a body (axum's own 405, say) the API's JSON error body,
/// keeping its headers (`Allow`).
fn fill_empty_error(
    resp: Response,
    method: &http::Method,
    path: impl std::fmt::Display,
) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.headers().contains_key(header::CONTENT_TYPE)
    {
        return resp;
    }
    let (parts, _) = resp.into_parts();
    let error = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            ApiError::new(
                status,
                "method_not_allowed",
                format!("{method} is not allowed on {path}; allowed: {allowed}"),
            )
        }
        _ => {
            let code = match status {
                StatusCode::BAD_REQUEST => "bad_request",
                StatusCode::NOT_FOUND => "not_found",
                StatusCode::REQUEST_TIMEOUT => "request_timeout",
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                StatusCode::INTERNAL_SERVER_ERROR => "internal",
                _ => "error",
            };
            let reason = status.canonical_reason().unwrap_or("error");
            ApiError::new(status, code, format!("{reason} ({method} {path})"))
        }
    };
    let mut filled = error.into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
            filled.headers_mut().append(name.clone(), value.clone());
        }
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_errors_get_json_bodies_and_keep_their_headers() {
        let mut resp = StatusCode::METHOD_NOT_ALLOWED.into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        let filled = fill_empty_error(resp, &http::Method::DELETE, "/v1/sites/demo/tx");
        assert_eq!(filled.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(filled.headers()[header::ALLOW], "GET,HEAD");
        assert_eq!(filled.headers()[header::CONTENT_TYPE], "application/json");

        let filled = fill_empty_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response(),
            &http::Method::POST,
            "/",
        );
        assert_eq!(filled.headers()[header::CONTENT_TYPE], "application/json");
        let ok = fill_empty_error(
            StatusCode::NO_CONTENT.into_response(),
            &http::Method::GET,
            "/",
        );
        assert!(!ok.headers().contains_key(header::CONTENT_TYPE));
    }
}
