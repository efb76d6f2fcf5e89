//! The service every HTTP request of a node or an edge enters ([`Front`]), before routing.
//!
//! It does what every answer needs, once per request: the limits on the request head
//! ([`check_head`]), a slot of the server's concurrency limit, and what its server does to
//! every answer on the way out ([`Frontend::finish`]: `nosniff`, counts, the node's request
//! id and log line). Then it sends the request to one of two places:
//!
//! - **pages**, straight to [`Frontend::page`] (the shared [`crate::pages::serve::answer`]):
//!   every path whose first segment is not one of the server's own ([`is_routed`]);
//! - **the router** (axum) for the rest: the API under `/v1`, `/healthz`, `/metrics`, and
//!   the `/_…` paths. Its fallback is the same page handler, for a reserved first segment
//!   that no route takes (`/static/…`).
//!
//! Pages skip the router because a page is the request a server answers most, and the
//! router's per-route service boxes (one per layer per request) were about as much CPU as
//! the answer itself. The rule needs no list of routes: a site name cannot start with `_`
//! and cannot be one of [`RESERVED_SITE_NAMES`], so a page's first segment (its site in path
//! mode) is never a route's, and in subdomain mode (`Host: <site>.<domain>`) a route's paths
//! (`/_sesame/live.js`) still reach the router.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use crate::http::answer::check_head;
use crate::http::api::RESERVED_SITE_NAMES;

/// What a server (a node, an edge) puts around its answers, and how it answers a page.
pub trait Frontend: Send + Sync + 'static {
    /// What [`Frontend::finish`] needs to know of a request, taken before it is answered.
    type Ticket: Send + 'static;

    /// Takes what the answer will need of `req` (before the head is checked: an answer
    /// to a request over the limits is finished too); `page`: it goes to [`Frontend::page`].
    fn begin(&self, req: &Request, page: bool) -> Self::Ticket;

    /// The span a request is answered in: what is logged meanwhile carries it.
    fn span(_ticket: &Self::Ticket) -> tracing::Span {
        tracing::Span::none()
    }

    /// Answers a request for a page.
    fn page(self: Arc<Self>, req: Request) -> impl Future<Output = Response> + Send;

    /// What every answer gets on its way out.
    fn finish(&self, ticket: Self::Ticket, resp: Response) -> Response;
}

/// Whether `path` belongs to the router rather than to pages: its first segment is a
/// reserved name or starts with `_` (see the module doc). `/` is a page (a site's home
/// page in subdomain mode).
pub fn is_routed(path: &str) -> bool {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let first = rest.split('/').next().unwrap_or("");
    first.starts_with('_') || RESERVED_SITE_NAMES.contains(&first)
}

/// What every connection's service shares.
struct Shared<F> {
    frontend: Arc<F>,
    router: axum::Router,
    /// Requests being answered at once, at most the server's limit.
    slots: tokio::sync::Semaphore,
}

/// The service of one connection (and, handed to `axum::serve`, the maker of each
/// connection's service, which knows the peer's address for `ConnectInfo`).
pub struct Front<F> {
    shared: Arc<Shared<F>>,
    peer: Option<SocketAddr>,
}

impl<F> Clone for Front<F> {
    fn clone(&self) -> Self {
        Front {
            shared: self.shared.clone(),
            peer: self.peer,
        }
    }
}

impl<F: Frontend> Front<F> {
    /// `router` answers what is not a page; at most `concurrency` requests are answered at
    /// once (the rest wait for a slot).
    pub fn new(frontend: Arc<F>, router: axum::Router, concurrency: usize) -> Front<F> {
        Front {
            shared: Arc::new(Shared {
                frontend,
                router,
                slots: tokio::sync::Semaphore::new(concurrency),
            }),
            peer: None,
        }
    }
}

impl<F: Frontend> tower::Service<Request> for Front<F> {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let shared = self.shared.clone();
        let routed = is_routed(req.uri().path());
        if let (true, Some(peer)) = (routed, self.peer) {
            req.extensions_mut().insert(ConnectInfo(peer));
        }
        Box::pin(async move {
            let ticket = shared.frontend.begin(&req, !routed);
            let resp = match check_head(&req) {
                Err(e) => e.into_response(),
                Ok(()) => {
                    let span = F::span(&ticket);
                    async {
                        let _slot = shared
                            .slots
                            .acquire()
                            .await
                            .expect("the slots are never closed");
                        if routed {
                            let Ok(resp) = shared.router.clone().oneshot(req).await;
                            resp
                        } else {
                            shared.frontend.clone().page(req).await
                        }
                    }
                    .instrument(span)
                    .await
                }
            };
            Ok(shared.frontend.finish(ticket, resp))
        })
    }
}

impl<F, L> tower::Service<axum::serve::IncomingStream<'_, L>> for Front<F>
where
    F: Frontend,
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Response = Front<F>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Front<F>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: axum::serve::IncomingStream<'_, L>) -> Self::Future {
        std::future::ready(Ok(Front {
            shared: self.shared.clone(),
            peer: Some(*incoming.remote_addr()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_every_path_outside_the_servers_own() {
        for routed in [
            "/v1",
            "/v1/sites",
            "/healthz",
            "/readyz",
            "/metrics",
            "/static/x.css",
            "/_sesame/live.js",
            "/_studio/",
            "/_preview/demo/id/",
        ] {
            assert!(is_routed(routed), "{routed}");
        }
        for page in [
            "/",
            "",
            "/demo",
            "/demo/",
            "/demo/alice",
            "/v1x",
            "/healthzz/a",
            "/metrics-site/x",
            "/demo/_sesame",
            // Encoded, a reserved segment is a (not found) page, as the router never
            // matched it either.
            "/%5Fsesame/live.js",
            "/%76%31/sites",
        ] {
            assert!(!is_routed(page), "{page}");
        }
    }
}
