//! Fault injection: a transport wrapper that asks a policy what to do with each message.
//!
//! [`FaultyTransport`] wraps any [`PeerTransport`] (the real QUIC endpoint, usually) and,
//! before each request, asks its [`Faults`] policy, given sender, receiver and request kind,
//! whether to deliver it, drop it (before or after the peer saw it), delay it, duplicate it,
//! or refuse it at once. Seeded randomized tests implement [`Faults`] with their own RNG;
//! [`Partitions`] is a ready-made policy that cuts links.
//!
//! A dropped message costs the sender its whole timeout, as a lost datagram would; a refused
//! one fails at once as unreachable, as a closed port would.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncRead;

use super::message::{PeerRequest, PeerResponse, RequestKind, SnapshotOffer};
use super::transport::{PeerTransport, SnapshotSendOptions, TransportError};
use crate::raft::NodeId;

/// What happens to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Deliver,
    /// Lost on the way: the peer never sees it; the sender times out.
    DropRequest,
    /// The peer handles it, but the answer is lost: the sender times out.
    DropResponse,
    /// Delivered after this long (the sender's timeout still runs).
    Delay(Duration),
    /// Delivered twice; the sender gets the first answer. Snapshots are delivered once.
    Duplicate,
    /// Fails at once as unreachable, as a partition the sender can see would.
    Refuse,
}

/// Decides the fate of each message. Called once per request or snapshot, before it is sent.
pub trait Faults: Send + Sync + 'static {
    fn decide(&self, from: NodeId, to: NodeId, kind: RequestKind) -> Fault;
}

/// A transport whose messages from node `from` go through a [`Faults`] policy.
pub struct FaultyTransport {
    from: NodeId,
    inner: Arc<dyn PeerTransport>,
    faults: Arc<dyn Faults>,
}

impl FaultyTransport {
    pub fn new(
        from: NodeId,
        inner: Arc<dyn PeerTransport>,
        faults: Arc<dyn Faults>,
    ) -> FaultyTransport {
        FaultyTransport {
            from,
            inner,
            faults,
        }
    }
}

fn refused(to: NodeId) -> TransportError {
    TransportError::Unreachable {
        to,
        reason: "refused by fault injection".into(),
    }
}

impl PeerTransport for FaultyTransport {
    fn request<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        request: &'a PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        let fault = self.faults.decide(self.from, to, request.kind());
        Box::pin(async move {
            let timed_out = TransportError::Timeout { to, after: timeout };
            match fault {
                Fault::Deliver => self.inner.request(to, addr, request, timeout).await,
                Fault::Refuse => Err(refused(to)),
                Fault::DropRequest => {
                    tokio::time::sleep(timeout).await;
                    Err(timed_out)
                }
                Fault::DropResponse => {
                    let started = tokio::time::Instant::now();
                    // What the peer answered is lost; only its having handled it matters.
                    let _ = self.inner.request(to, addr, request, timeout).await;
                    tokio::time::sleep_until(started + timeout).await;
                    Err(timed_out)
                }
                Fault::Delay(delay) => {
                    let delivered = async {
                        tokio::time::sleep(delay).await;
                        self.inner.request(to, addr, request, timeout).await
                    };
                    tokio::time::timeout(timeout, delivered)
                        .await
                        .unwrap_or(Err(timed_out))
                }
                Fault::Duplicate => {
                    let first = self.inner.request(to, addr, request, timeout).await;
                    let _ = self.inner.request(to, addr, request, timeout).await;
                    first
                }
            }
        })
    }

    fn send_snapshot<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
        offer: &'a SnapshotOffer,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
        options: SnapshotSendOptions,
    ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
        let fault = self
            .faults
            .decide(self.from, to, RequestKind::InstallSnapshot);
        Box::pin(async move {
            let after = options.chunk_timeout;
            match fault {
                Fault::Deliver | Fault::Duplicate => {
                    self.inner
                        .send_snapshot(to, addr, offer, data, options)
                        .await
                }
                Fault::Refuse => Err(refused(to)),
                Fault::DropRequest => {
                    tokio::time::sleep(after).await;
                    Err(TransportError::Timeout { to, after })
                }
                Fault::DropResponse => {
                    let _ = self
                        .inner
                        .send_snapshot(to, addr, offer, data, options)
                        .await;
                    Err(TransportError::Timeout { to, after })
                }
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    self.inner
                        .send_snapshot(to, addr, offer, data, options)
                        .await
                }
            }
        })
    }
}

/// A policy that refuses messages on cut links and delivers the rest.
#[derive(Debug, Default)]
pub struct Partitions {
    /// Directed links `(from, to)` that are cut.
    cut: Mutex<BTreeSet<(NodeId, NodeId)>>,
}

impl Partitions {
    pub fn new() -> Partitions {
        Partitions::default()
    }

    /// Cuts the link from `from` to `to` (one direction).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.links().insert((from, to));
    }

    /// Cuts every link to and from `node`, among `nodes`.
    pub fn isolate(&self, node: NodeId, nodes: &[NodeId]) {
        let mut cut = self.links();
        for &other in nodes.iter().filter(|&&n| n != node) {
            cut.insert((node, other));
            cut.insert((other, node));
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.links().clear();
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeSet<(NodeId, NodeId)>> {
        self.cut
            .lock()
            .expect("partition lock is never held across a panic")
    }
}

impl Faults for Partitions {
    fn decide(&self, from: NodeId, to: NodeId, _kind: RequestKind) -> Fault {
        if self.links().contains(&(from, to)) {
            Fault::Refuse
        } else {
            Fault::Deliver
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers every ping at once and counts what it delivered.
    #[derive(Default)]
    struct Counting {
        delivered: AtomicUsize,
    }

    impl PeerTransport for Counting {
        fn request<'a>(
            &'a self,
            _to: NodeId,
            _addr: &'a str,
            request: &'a PeerRequest,
            _timeout: Duration,
        ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
            self.delivered.fetch_add(1, Ordering::SeqCst);
            let PeerRequest::Ping(n) = request else {
                panic!("the test sends pings only")
            };
            let n = *n;
            Box::pin(async move { Ok(PeerResponse::Pong(n)) })
        }

        fn send_snapshot<'a>(
            &'a self,
            _to: NodeId,
            _addr: &'a str,
            _offer: &'a SnapshotOffer,
            _data: &'a mut (dyn AsyncRead + Send + Unpin),
            _options: SnapshotSendOptions,
        ) -> BoxFuture<'a, Result<PeerResponse, TransportError>> {
            unimplemented!("the test sends no snapshot")
        }
    }

    /// Applies one fault to everything.
    struct Always(Fault);

    impl Faults for Always {
        fn decide(&self, _from: NodeId, _to: NodeId, _kind: RequestKind) -> Fault {
            self.0
        }
    }

    async fn ping(fault: Fault) -> (Result<PeerResponse, TransportError>, usize) {
        let inner = Arc::new(Counting::default());
        let faulty = FaultyTransport::new(1, inner.clone(), Arc::new(Always(fault)));
        let answer = faulty
            .request(2, "x", &PeerRequest::Ping(9), Duration::from_millis(100))
            .await;
        (answer, inner.delivered.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn each_fault_does_what_it_says() {
        let (answer, delivered) = ping(Fault::Deliver).await;
        assert_eq!(answer.ok(), Some(PeerResponse::Pong(9)));
        assert_eq!(delivered, 1);

        let (answer, delivered) = ping(Fault::DropRequest).await;
        assert!(matches!(answer, Err(TransportError::Timeout { to: 2, .. })));
        assert_eq!(delivered, 0);

        let (answer, delivered) = ping(Fault::DropResponse).await;
        assert!(matches!(answer, Err(TransportError::Timeout { to: 2, .. })));
        assert_eq!(delivered, 1);

        let (answer, delivered) = ping(Fault::Duplicate).await;
        assert_eq!(answer.ok(), Some(PeerResponse::Pong(9)));
        assert_eq!(delivered, 2);

        let (answer, delivered) = ping(Fault::Refuse).await;
        assert!(matches!(
            answer,
            Err(TransportError::Unreachable { to: 2, .. })
        ));
        assert_eq!(delivered, 0);

        let started = tokio::time::Instant::now();
        let (answer, _) = ping(Fault::Delay(Duration::from_millis(30))).await;
        assert_eq!(answer.ok(), Some(PeerResponse::Pong(9)));
        assert!(started.elapsed() >= Duration::from_millis(30));
        let (answer, delivered) = ping(Fault::Delay(Duration::from_millis(500))).await;
        assert!(matches!(answer, Err(TransportError::Timeout { .. })));
        assert_eq!(delivered, 0, "a delay past the timeout never delivers");
    }

    #[test]
    fn partitions_cut_links_both_ways_and_heal() {
        let p = Partitions::new();
        p.isolate(1, &[1, 2, 3]);
        assert_eq!(p.decide(1, 2, RequestKind::Vote), Fault::Refuse);
        assert_eq!(p.decide(3, 1, RequestKind::Vote), Fault::Refuse);
        assert_eq!(p.decide(2, 3, RequestKind::Vote), Fault::Deliver);
        p.heal();
        assert_eq!(p.decide(1, 2, RequestKind::Vote), Fault::Deliver);
    }
}
