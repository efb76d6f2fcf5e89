//! The client's side of a sync session, sans I/O: it keeps the [`Replica`], says what to send
//! when a connection opens (hello, every subscription from where it has reached, the pending
//! transactions in order), applies what the node sends, and reports to the application
//! ([`Event`]). The driver owns the connection and the clock: it calls
//! [`ClientSession::connected`] / [`ClientSession::receive`] / [`ClientSession::disconnected`]
//! and sends what [`ClientSession::poll_transmit`] gives, and asks
//! [`ClientSession::reconnect_delay`] how long to wait before dialling again.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use sesame_proto::sync::{
    decode, ClientMsg, PushResult, ServerMsg, Subscription, SyncTuple, Target,
    PUSHES_IN_FLIGHT_MAX, SYNC_PROTOCOL_VERSION,
};
use sesame_proto::{LogIndex, Op, Transaction};

use crate::replica::{PendingTx, Replica, ReplicaSub};
use crate::store::StoreError;

/// First wait before dialling again; doubles per failed attempt up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// What the application hears about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The node accepted the session.
    Connected {
        node_id: u64,
        applied_index: LogIndex,
    },
    /// The session ended (`code` and `message` from the node, or the transport's reason).
    Disconnected { code: String, message: String },
    /// Tuples of a subscription changed in the replica (a snapshot part or live changes).
    Changed {
        site: String,
        sub: u32,
        through: Option<LogIndex>,
        tuples: Vec<SyncTuple>,
    },
    /// A queued transaction committed (or had committed before: a retry).
    Committed {
        site: String,
        seq: u64,
        index: LogIndex,
    },
    /// A queued transaction was refused; it left the queue and the pending view.
    Rejected {
        site: String,
        seq: u64,
        code: String,
        message: String,
    },
    /// The node ended a subscription; it is subscribed again from where it was.
    Resync { sub: u32, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Offline,
    /// Hello sent, waiting for the welcome.
    Greeting,
    Open,
}

/// A client's side of the protocol, over its replica.
pub struct ClientSession {
    replica: Replica,
    client_id: String,
    token: String,
    state: State,
    /// Failed connection attempts since the last welcome.
    attempts: u32,
    /// Pushed and not yet acknowledged: queue position → push id (the same number).
    in_flight: BTreeMap<u64, ()>,
    /// The queue position up to which transactions were pushed on this connection.
    pushed_through: u64,
    /// Subscriptions receiving a snapshot whose first part has arrived.
    snapshotting: BTreeMap<u32, ()>,
    out: VecDeque<ClientMsg>,
    events: VecDeque<Event>,
    /// The node's error that ended the last session.
    closed_by_node: Option<(String, String)>,
}

/// Why the client cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("replica: {0}")]
    Replica(#[from] StoreError),
    #[error("the node sent a message that does not decode: {0}")]
    BadFrame(String),
}

impl ClientSession {
    /// A session for `replica`, as client `client_id` (else the replica's own id).
    pub fn new(
        mut replica: Replica,
        token: String,
        client_id: Option<&str>,
    ) -> Result<ClientSession, ClientError> {
        let client_id = replica.client_id(client_id)?;
        Ok(ClientSession {
            replica,
            client_id,
            token,
            state: State::Offline,
            attempts: 0,
            in_flight: BTreeMap::new(),
            pushed_through: 0,
            snapshotting: BTreeMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            closed_by_node: None,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// No connection (none made yet, or the last one ended).
    pub fn is_offline(&self) -> bool {
        self.state == State::Offline
    }

    /// The node's error that ended the session, once.
    pub fn take_close(&mut self) -> Option<(String, String)> {
        self.closed_by_node.take()
    }

    /// A dial failed before any session: the next wait grows.
    pub fn dial_failed(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<ClientMsg> {
        self.out.pop_front()
    }

    /// The next thing to tell the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Subscribes to `target` (kept in the replica: it is subscribed again on every
    /// connection, from where it has reached). Returns the subscription.
    pub fn subscribe(&mut self, target: Target) -> Result<ReplicaSub, ClientError> {
        self.subscribe_from(target, 0)
    }

    /// Like [`ClientSession::subscribe`]; a new subscription starts after `since` (the
    /// client asks for changes only).
    pub fn subscribe_from(
        &mut self,
        target: Target,
        since: LogIndex,
    ) -> Result<ReplicaSub, ClientError> {
        if let Some(existing) = self
            .replica
            .subscriptions()?
            .into_iter()
            .find(|s| s.target == target)
        {
            // Already followed (and subscribed on every connection): nothing to send.
            return Ok(existing);
        }
        let sub = self.replica.subscribe(&target, since)?;
        if self.state == State::Open {
            self.send_subscribe(&sub);
        }
        Ok(sub)
    }

    /// Queues a transaction (persisted at once, visible in reads as pending) and pushes it
    /// when the session is open. Returns its site sequence number.
    pub fn transact(&mut self, site: &str, ops: Vec<Op>) -> Result<PendingTx, ClientError> {
        let p = self.replica.enqueue(&self.client_id, site, ops)?;
        self.push_more()?;
        Ok(p)
    }

    /// Tells the node a mailbox tuple arrived.
    pub fn delivered(&mut self, site: &str, collection: &str, key: &str, version: LogIndex) {
        if self.state == State::Open {
            self.out.push_back(ClientMsg::Delivered {
                site: site.into(),
                collection: collection.into(),
                key: key.into(),
                version,
            });
        }
    }

    /// A connection opened: say hello.
    pub fn connected(&mut self) {
        self.closed_by_node = None;
        self.out.clear();
        self.in_flight.clear();
        self.snapshotting.clear();
        self.pushed_through = 0;
        self.state = State::Greeting;
        self.out.push_back(ClientMsg::Hello {
            version: SYNC_PROTOCOL_VERSION,
            token: self.token.clone(),
            client_id: self.client_id.clone(),
        });
    }

    /// The connection ended (or could not be made).
    pub fn disconnected(&mut self, code: &str, message: &str) {
        if self.state == State::Open {
            self.attempts = 0;
        }
        self.attempts = self.attempts.saturating_add(1);
        self.state = State::Offline;
        self.out.clear();
        self.in_flight.clear();
        self.snapshotting.clear();
        self.events.push_back(Event::Disconnected {
            code: code.into(),
            message: message.into(),
        });
    }

    /// How long to wait before dialling again: exponential backoff from [`RECONNECT_MIN`]
    /// to [`RECONNECT_MAX`], with jitter from `random` (any value; the driver draws it), so
    /// that clients cut off together do not return together.
    pub fn reconnect_delay(&self, random: u64) -> Duration {
        let exp = self.attempts.saturating_sub(1).min(16);
        let base = RECONNECT_MIN.saturating_mul(1u32 << exp).min(RECONNECT_MAX);
        // Between half and all of the base.
        let half = base / 2;
        let jitter = (random % (half.as_millis() as u64 + 1)) as u32;
        half + Duration::from_millis(jitter as u64)
    }

    /// A frame from the node.
    pub fn receive(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        let msg: ServerMsg = decode(frame).map_err(|e| ClientError::BadFrame(e.to_string()))?;
        self.handle(msg)
    }

    fn handle(&mut self, msg: ServerMsg) -> Result<(), ClientError> {
        match msg {
            ServerMsg::Welcome {
                node_id,
                applied_index,
                ..
            } => {
                self.state = State::Open;
                self.attempts = 0;
                self.events.push_back(Event::Connected {
                    node_id,
                    applied_index,
                });
                for sub in self.replica.subscriptions()? {
                    self.send_subscribe(&sub);
                }
                self.push_more()?;
            }
            ServerMsg::Snapshot {
                sub,
                at,
                tuples,
                last,
            } => {
                let Some(s) = self.sub(sub)? else {
                    return Ok(());
                };
                let first = self.snapshotting.insert(sub, ()).is_none();
                self.replica.apply_snapshot(&s, at, &tuples, first, last)?;
                if last {
                    self.snapshotting.remove(&sub);
                }
                self.events.push_back(Event::Changed {
                    site: s.target.site().to_string(),
                    sub,
                    through: last.then_some(at),
                    tuples,
                });
            }
            ServerMsg::Changes {
                sub,
                through,
                tuples,
            } => {
                let Some(s) = self.sub(sub)? else {
                    return Ok(());
                };
                let through = (through > 0).then_some(through);
                self.replica.apply_changes(&s, through, &tuples)?;
                self.events.push_back(Event::Changed {
                    site: s.target.site().to_string(),
                    sub,
                    through,
                    tuples,
                });
            }
            ServerMsg::Acked { id, result } => {
                self.in_flight.remove(&id);
                let (committed, event) = match result {
                    PushResult::Committed { index } | PushResult::Duplicate { index } => {
                        (Some(index), Some(Ok(index)))
                    }
                    PushResult::Rejected { code, message } => (None, Some(Err((code, message)))),
                    // Stays queued: pushed again, in order, on the next connection.
                    PushResult::Unknown { .. } => (None, None),
                };
                if let Some(outcome) = event {
                    if let Some(tx) = self.replica.settle(id, committed, &self.client_id)? {
                        let seq = tx.origin.as_ref().map_or(0, |o| o.seq);
                        self.events.push_back(match outcome {
                            Ok(index) => Event::Committed {
                                site: tx.site,
                                seq,
                                index,
                            },
                            Err((code, message)) => Event::Rejected {
                                site: tx.site,
                                seq,
                                code,
                                message,
                            },
                        });
                    }
                }
                self.push_more()?;
            }
            ServerMsg::Resync { sub, reason } => {
                self.snapshotting.remove(&sub);
                if let Some(s) = self.sub(sub)? {
                    self.events.push_back(Event::Resync { sub, reason });
                    if self.state == State::Open {
                        self.send_subscribe(&s);
                    }
                }
            }
            ServerMsg::Error { code, message } => {
                self.disconnected(&code, &message);
                self.closed_by_node = Some((code, message));
            }
            ServerMsg::Pong { .. } | ServerMsg::Presence { .. } | ServerMsg::Version { .. } => {}
        }
        Ok(())
    }

    fn sub(&self, id: u32) -> Result<Option<ReplicaSub>, ClientError> {
        Ok(self
            .replica
            .subscriptions()?
            .into_iter()
            .find(|s| s.id == id))
    }

    fn send_subscribe(&mut self, sub: &ReplicaSub) {
        self.out.push_back(ClientMsg::Subscribe(Subscription {
            id: sub.id,
            target: sub.target.clone(),
            since: sub.through,
        }));
    }

    /// Pushes queued transactions, in order, while fewer than the limit wait for their
    /// acknowledgement.
    fn push_more(&mut self) -> Result<(), ClientError> {
        if self.state != State::Open {
            return Ok(());
        }
        let room = PUSHES_IN_FLIGHT_MAX.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        for p in self.replica.pending(self.pushed_through, room)? {
            self.pushed_through = p.n;
            self.in_flight.insert(p.n, ());
            self.out.push_back(ClientMsg::Push { id: p.n, tx: p.tx });
        }
        Ok(())
    }

    /// Transactions waiting for their acknowledgement (pushed or not).
    pub fn pending_count(&self) -> Result<u64, ClientError> {
        Ok(self.replica.pending_count()?)
    }

    /// A transaction as this client would push it now (for tests and tools).
    pub fn pending(&self) -> Result<Vec<Transaction>, ClientError> {
        Ok(self
            .replica
            .pending(0, usize::MAX >> 1)?
            .into_iter()
            .map(|p| p.tx)
            .collect())
    }
}
