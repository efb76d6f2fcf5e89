//! Everything that speaks HTTP: the service every request enters ([`front`]: pages go
//! straight to [`crate::pages::serve`], the rest to the router), the JSON API under `/v1`
//! ([`api`], [`cluster`]), who is calling ([`auth`]), error bodies ([`error`]), per-site
//! rate limits ([`limits`]), WebRTC signalling and the live scripts ([`live`]), and what a
//! node does around every answer ([`answer`]). The router falls back to pages too.

pub mod accounts;
pub mod answer;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod front;
pub mod limits;
pub mod live;

pub use api::router;

/// An HTTP listener whose connections send each write at once (`TCP_NODELAY`), as nginx's
/// do: an answer written in two parts (head, then a body) must not wait for the client's
/// delayed acknowledgement of the first. Used by the node and by `sesame edge`.
pub fn without_delay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt as _;
    fn no_delay(stream: &mut tokio::net::TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on a connection: {e}");
        }
    }
    listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream))
}
