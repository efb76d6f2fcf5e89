//! The node's side of a client sync session, sans I/O: it decodes what a client sends, checks
//! it against the session's rights and limits, keeps each subscription's position, picks
//! the changes each subscription follows out of the commits the node applies, and says what
//! the driver must do ([`Task`]) and send ([`ServerSession::poll_transmit`]). The driver (a
//! QUIC connection today, a WebRTC data channel next) owns sockets, the clock, the store
//! and the write path.
//!
//! Order within a session: the driver hands over client frames, commit batches, catch-up
//! reads and push outcomes in the order they happen; the session never reorders them. A
//! subscription is caught up by the driver from one store snapshot taken after the session
//! has seen every batch older than it, so the batches that follow continue it exactly: no
//! gap, no duplicate (see [`ServerSession::catch_up`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use sesame_proto::sync::{
    decode, ClientMsg, PushResult, ServerMsg, Subscription, SyncTuple, Target, FIELD_BYTES_MAX,
    PRESENCE_TOPICS_MAX, PUSHES_IN_FLIGHT_MAX, SUBSCRIPTIONS_PER_SESSION_MAX,
    SYNC_PROTOCOL_VERSION, TUPLES_PER_MESSAGE_MAX,
};
use sesame_proto::tuple::validate_client_id;
use sesame_proto::{Home, LogIndex, Op, Role, Transaction, Tuple};

use crate::Change;

/// What the holder of a session's token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The admin token: everything.
    Admin,
    /// A site token with its role, limited to `scopes` when there are any.
    Site {
        site: String,
        role: Role,
        scopes: Vec<sesame_proto::Scope>,
    },
    /// A visitor of a site's pages, with no token: only what the site's grant allows.
    Visitor(Grant),
}

/// What a site lets its visitors do live (the `_live/grants` tuple): read some collections,
/// and post into some, each post a new key (never an overwrite) of bounded size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    pub site: String,
    /// Collections visitors may subscribe to.
    pub read: Vec<String>,
    /// Collections visitors may post into, with the largest value (encoded bytes) a post
    /// may carry.
    pub post: BTreeMap<String, usize>,
    /// Posts one visitor may make per minute.
    pub posts_per_minute: u32,
}

/// The collection and key of a site's grant for visitors.
pub const GRANT_COLLECTION: &str = "_live";
pub const GRANT_KEY: &str = "grants";
/// Largest value a grant may allow a post to carry.
pub const POST_BYTES_MAX: usize = 16 << 10;
/// Posts per minute per visitor when the grant does not say.
pub const POSTS_PER_MINUTE_DEFAULT: u32 = 10;

impl Grant {
    /// Reads a grant from the `_live/grants` tuple's value (JSON:
    /// `{"read": ["c", ...], "post": {"c": {"max_bytes": N}}, "posts_per_minute": N}`).
    /// Anything it does not understand grants nothing.
    pub fn from_value(site: &str, value: &sesame_proto::Value) -> Grant {
        let json = value.to_json();
        let read = json["read"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let post = json["post"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(c, g)| {
                        let max = g["max_bytes"].as_u64().unwrap_or(1024) as usize;
                        (c.clone(), max.min(POST_BYTES_MAX))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let posts_per_minute = json["posts_per_minute"]
            .as_u64()
            .map_or(POSTS_PER_MINUTE_DEFAULT, |n| n.min(600) as u32);
        Grant {
            site: site.to_string(),
            read,
            post,
            posts_per_minute,
        }
    }

    /// Why this grant does not let a visitor follow `target`, if it does not.
    fn check_read(&self, target: &Target) -> Result<(), String> {
        match target {
            Target::Site {
                site,
                collection: Some(c),
                ..
            } if *site == self.site && self.read.contains(c) => Ok(()),
            Target::Site { site, .. } if *site != self.site => {
                Err(format!("this page's visitors may not read site {site:?}"))
            }
            Target::Site {
                collection: Some(c),
                ..
            } => Err(format!(
                "site {:?} does not let visitors read collection {c:?}",
                self.site
            )),
            Target::Site { .. } => Err("a visitor must name a collection".into()),
            Target::Mailbox { .. } => Err("visitors have no mailbox".into()),
        }
    }

    /// Why this grant does not let a visitor post `tx`, if it does not.
    pub fn check_post(&self, tx: &Transaction) -> Result<(), String> {
        if tx.site != self.site {
            return Err(format!(
                "this page's visitors may not write to site {:?}",
                tx.site
            ));
        }
        for (i, op) in tx.ops.iter().enumerate() {
            let Op::Put {
                collection,
                value,
                if_version: Some(0),
                ..
            } = op
            else {
                return Err(format!(
                    "op {i}: a visitor may only add new tuples (put with if_version 0)"
                ));
            };
            let Some(max) = self.post.get(collection) else {
                return Err(format!(
                    "op {i}: site {:?} does not let visitors post into {collection:?}",
                    self.site
                ));
            };
            let bytes = sesame_proto::codec::encoded_len(value);
            if bytes > *max {
                return Err(format!(
                    "op {i}: the post is {bytes} bytes, the limit for {collection:?} is {max}"
                ));
            }
        }
        Ok(())
    }
}

impl Access {
    /// Why this access does not allow `role` on `site`, if it does not.
    pub fn check(&self, site: &str, role: Role) -> Result<(), String> {
        match self {
            Access::Visitor(g) if g.site == site && role == Role::Reader => Ok(()),
            Access::Visitor(g) => Err(format!(
                "a visitor of {:?} may only read what its grant allows",
                g.site
            )),
            Access::Admin => Ok(()),
            Access::Site {
                site: s,
                role: r,
                scopes,
            } if s == site && *r >= role && !scopes.is_empty() => Err(format!(
                "this token is limited to {}; this needs a token for the whole site",
                sesame_proto::command::describe_scopes(scopes)
            )),
            Access::Site {
                site: s, role: r, ..
            } if s == site && *r >= role => Ok(()),
            Access::Site {
                site: s, role: r, ..
            } if s == site => Err(format!(
                "this token is a {} token for site {s:?}; this needs {}",
                r.as_str(),
                role.as_str()
            )),
            Access::Site { site: s, .. } => {
                Err(format!("this token is for site {s:?}, not {site:?}"))
            }
        }
    }

    /// The scopes a site token is limited to (none for the admin or a whole-site token).
    fn scopes(&self) -> &[sesame_proto::Scope] {
        match self {
            Access::Site { scopes, .. } => scopes,
            _ => &[],
        }
    }

    /// Whether this (non-visitor) access may follow `target`.
    fn check_target(&self, target: &Target) -> Result<(), String> {
        let scopes = self.scopes();
        if scopes.is_empty() {
            return self.check(target.site(), Role::Reader);
        }
        self.unscoped().check(target.site(), Role::Reader)?;
        match target {
            // A client's own mailbox is its own.
            Target::Mailbox { .. } => Ok(()),
            Target::Site {
                collection: Some(c),
                prefix,
                ..
            } => sesame_proto::command::check_scoped_read(scopes, c, prefix),
            Target::Site {
                collection: None, ..
            } => Err(format!(
                "this token is limited to {}: subscribe to one collection",
                sesame_proto::command::describe_scopes(scopes)
            )),
        }
    }

    /// Whether this (non-visitor) access may push `tx`.
    fn check_write(&self, tx: &Transaction) -> Result<(), String> {
        self.unscoped().check(&tx.site, Role::Editor)?;
        sesame_proto::command::check_scoped_ops(self.scopes(), &tx.ops)
    }

    /// The same access without its scopes (to check the site and role alone).
    fn unscoped(&self) -> Access {
        match self {
            Access::Site { site, role, .. } => Access::Site {
                site: site.clone(),
                role: *role,
                scopes: Vec::new(),
            },
            other => other.clone(),
        }
    }
}

/// Changes the node applied, as the driver reads them from the change feed: every change
/// after index `from` up to and including `through` (compacted: a key's latest change).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub from: LogIndex,
    pub through: LogIndex,
    pub changes: Vec<Change>,
}

/// Something the driver must do for the session, then report back.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Check the hello's token; answer with [`ServerSession::authenticated`].
    Authenticate { token: String, client_id: String },
    /// Catch subscription `sub` up: read the store at one snapshot and hand the tuples to
    /// [`ServerSession::catch_up`]. From nothing (a snapshot of every tuple the target holds)
    /// when `since` is 0 or older than the site's change feed reaches, else the target's
    /// changes after `since`.
    CatchUp {
        sub: u32,
        target: Target,
        since: LogIndex,
    },
    /// Commit these transactions, in this order, in one log entry (so a failure cannot
    /// commit a later one without an earlier one); answer with [`ServerSession::pushed`].
    Commit {
        ids: Vec<u64>,
        txs: Vec<Transaction>,
    },
    /// The client has mailbox tuple `(site, collection, key)` at `version`: record the
    /// delivery (the driver writes a receipt into the sender's mailbox).
    Deliver {
        site: String,
        collection: String,
        key: String,
        version: LogIndex,
    },
    /// Count the session among `topic`'s viewers until it ends, and tell it the count with
    /// [`ServerSession::notify`].
    Presence { topic: String },
    /// Tell the session of `site`'s new versions with [`ServerSession::notify`].
    WatchVersion { site: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAuth { client_id: String },
    Open { client_id: String, access: Access },
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    /// Waiting for the driver's catch-up read.
    CatchingUp,
    /// Has every change it follows up to this index.
    Live(LogIndex),
}

#[derive(Debug, Clone)]
struct Sub {
    target: Target,
    position: Position,
}

/// One client's session on a node.
#[derive(Debug)]
pub struct ServerSession {
    node_id: u64,
    state: State,
    subs: BTreeMap<u32, Sub>,
    /// The `through` of the last batch seen: the next must start there.
    feed_at: Option<LogIndex>,
    /// Pushes received and not yet handed to the driver, in order.
    queued: VecDeque<(u64, Transaction)>,
    /// Pushes handed to the driver and not yet answered.
    committing: usize,
    out: VecDeque<ServerMsg>,
    tasks: VecDeque<Task>,
    presence: Vec<String>,
}

/// Most transactions one [`Task::Commit`] carries.
pub const PUSHES_PER_COMMIT_MAX: usize = 256;
/// Encoded bytes after which no more pushes join a [`Task::Commit`] (one alone may be up to
/// a transaction's own limit).
pub const PUSH_BYTES_PER_COMMIT_MAX: usize = 4 << 20;

impl ServerSession {
    pub fn new(node_id: u64) -> ServerSession {
        ServerSession {
            node_id,
            state: State::AwaitHello,
            subs: BTreeMap::new(),
            feed_at: None,
            queued: VecDeque::new(),
            committing: 0,
            out: VecDeque::new(),
            tasks: VecDeque::new(),
            presence: Vec::new(),
        }
    }

    /// Something the driver tells the client itself (presence counts, new versions), in
    /// order with the session's own messages.
    pub fn notify(&mut self, msg: ServerMsg) {
        if !self.is_closed() {
            self.out.push_back(msg);
        }
    }

    /// Whether the session belongs to a visitor (no token; the site's grant).
    pub fn is_visitor(&self) -> bool {
        matches!(
            &self.state,
            State::Open {
                access: Access::Visitor(_),
                ..
            }
        )
    }

    /// The client id the hello gave, once the session is open.
    pub fn client_id(&self) -> Option<&str> {
        match &self.state {
            State::Open { client_id, .. } => Some(client_id),
            _ => None,
        }
    }

    /// Whether the session has ended: the driver sends what is left and closes.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<ServerMsg> {
        self.out.pop_front()
    }

    /// The next thing the driver must do.
    pub fn poll_task(&mut self) -> Option<Task> {
        self.tasks.pop_front()
    }

    /// Ends the session with an error the client is told.
    pub fn close(&mut self, code: &str, message: impl Into<String>) {
        if self.state != State::Closed {
            self.out.push_back(ServerMsg::Error {
                code: code.into(),
                message: message.into(),
            });
            self.state = State::Closed;
            self.tasks.clear();
            self.queued.clear();
        }
    }

    /// A frame the client sent. A frame that does not decode, breaks a limit or comes out
    /// of turn ends the session.
    pub fn receive(&mut self, frame: &[u8]) {
        if self.is_closed() {
            return;
        }
        match decode::<ClientMsg>(frame) {
            Ok(msg) => self.handle(msg),
            Err(e) => self.close("bad_frame", format!("cannot decode the message: {e}")),
        }
    }

    /// A message the client sent, decoded by the driver (a transport with its own
    /// encoding: JSON on a browser's data channel).
    pub fn handle(&mut self, msg: ClientMsg) {
        if self.is_closed() {
            return;
        }
        match (&self.state, msg) {
            (
                State::AwaitHello,
                ClientMsg::Hello {
                    version,
                    token,
                    client_id,
                },
            ) => {
                if version != SYNC_PROTOCOL_VERSION {
                    return self.close(
                        "version",
                        format!(
                            "this node speaks sync protocol version {SYNC_PROTOCOL_VERSION}, \
                             the client {version}"
                        ),
                    );
                }
                if let Err(e) = validate_client_id(&client_id) {
                    return self.close("bad_request", format!("client_id: {e}"));
                }
                if token.len() > FIELD_BYTES_MAX {
                    return self.close("unauthorized", "the token is too long");
                }
                self.tasks.push_back(Task::Authenticate {
                    token,
                    client_id: client_id.clone(),
                });
                self.state = State::AwaitAuth { client_id };
            }
            (State::AwaitHello, _) => self.close("bad_request", "the first message must be hello"),
            (State::AwaitAuth { .. }, _) => {
                self.close("bad_request", "wait for the welcome before sending more")
            }
            (State::Open { .. }, ClientMsg::Hello { .. }) => {
                self.close("bad_request", "hello was already said")
            }
            (State::Open { .. }, ClientMsg::Subscribe(sub)) => self.subscribe(sub),
            (State::Open { .. }, ClientMsg::Unsubscribe { id }) => {
                self.subs.remove(&id);
            }
            (State::Open { .. }, ClientMsg::Push { id, tx }) => self.push(id, tx),
            (
                State::Open { access, .. },
                ClientMsg::Delivered {
                    site,
                    collection,
                    key,
                    version,
                },
            ) => {
                if matches!(access, Access::Visitor(_)) {
                    return self.close("forbidden", "visitors have no mailbox");
                }
                if let Err(e) = access.check(&site, Role::Reader) {
                    return self.close("forbidden", e);
                }
                self.tasks.push_back(Task::Deliver {
                    site,
                    collection,
                    key,
                    version,
                });
            }
            (State::Open { .. }, ClientMsg::Ping { nonce }) => {
                self.out.push_back(ServerMsg::Pong { nonce })
            }
            (State::Open { .. }, ClientMsg::Presence { topic }) => {
                if topic.is_empty() || topic.len() > FIELD_BYTES_MAX {
                    return self.close("bad_request", "a presence topic is 1 to 1024 bytes");
                }
                if self.presence.contains(&topic) {
                    return;
                }
                if self.presence.len() >= PRESENCE_TOPICS_MAX {
                    return self.close(
                        "limit",
                        format!("a session joins at most {PRESENCE_TOPICS_MAX} presence topics"),
                    );
                }
                self.presence.push(topic.clone());
                self.tasks.push_back(Task::Presence { topic });
            }
            (State::Open { access, .. }, ClientMsg::WatchVersion { site }) => {
                if let Err(e) = access.check(&site, Role::Reader) {
                    return self.close("forbidden", e);
                }
                self.tasks.push_back(Task::WatchVersion { site });
            }
            (State::Closed, _) => {}
        }
    }

    /// The driver's answer to [`Task::Authenticate`]: the token's access, or why it is
    /// refused. `applied_index` is the node's, for the welcome; `feed_at` is where the batches
    /// this session will be given start.
    pub fn authenticated(
        &mut self,
        result: Result<Access, String>,
        applied_index: LogIndex,
        feed_at: LogIndex,
    ) {
        let State::AwaitAuth { client_id } = &self.state else {
            return;
        };
        match result {
            Ok(access) => {
                self.state = State::Open {
                    client_id: client_id.clone(),
                    access,
                };
                self.feed_at = Some(feed_at);
                self.out.push_back(ServerMsg::Welcome {
                    version: SYNC_PROTOCOL_VERSION,
                    node_id: self.node_id,
                    applied_index,
                });
            }
            Err(e) => self.close("unauthorized", e),
        }
    }

    fn subscribe(&mut self, sub: Subscription) {
        let State::Open { access, .. } = &self.state else {
            return;
        };
        let allowed = match access {
            Access::Visitor(grant) => grant.check_read(&sub.target),
            access => access.check_target(&sub.target),
        };
        if let Err(e) = allowed {
            return self.close("forbidden", e);
        }
        if let Target::Site {
            collection, prefix, ..
        } = &sub.target
        {
            if prefix.len() > FIELD_BYTES_MAX {
                return self.close("bad_request", "the key prefix is too long");
            }
            if let Some(c) = collection {
                if let Err(e) = sesame_proto::names::validate_collection(c) {
                    return self.close("bad_request", e.to_string());
                }
            }
        }
        if let Err(e) = sesame_proto::names::validate_site(sub.target.site()) {
            return self.close("bad_request", e.to_string());
        }
        if !self.subs.contains_key(&sub.id) && self.subs.len() >= SUBSCRIPTIONS_PER_SESSION_MAX {
            return self.close(
                "limit",
                format!("a session holds at most {SUBSCRIPTIONS_PER_SESSION_MAX} subscriptions"),
            );
        }
        self.subs.insert(
            sub.id,
            Sub {
                target: sub.target.clone(),
                position: Position::CatchingUp,
            },
        );
        self.tasks.push_back(Task::CatchUp {
            sub: sub.id,
            target: sub.target,
            since: sub.since,
        });
    }

    fn push(&mut self, id: u64, tx: Transaction) {
        let State::Open { access, client_id } = &self.state else {
            return;
        };
        if self.queued.len() + self.committing >= PUSHES_IN_FLIGHT_MAX {
            return self.close(
                "limit",
                format!("at most {PUSHES_IN_FLIGHT_MAX} pushes may wait for their acknowledgement"),
            );
        }
        let allowed = match access {
            Access::Visitor(grant) => grant.check_post(&tx),
            access => access.check_write(&tx),
        };
        let refused = if let Err(e) = tx.validate() {
            Some(("bad_request", e.to_string()))
        } else if let Err(e) = allowed {
            Some(("forbidden", e))
        } else {
            match &tx.origin {
                Some(o) if &o.client_id == client_id => None,
                _ => Some((
                    "bad_request",
                    "a pushed transaction's origin must be this session's client_id with a seq"
                        .to_string(),
                )),
            }
        };
        if let Some((code, message)) = refused {
            self.out.push_back(ServerMsg::Acked {
                id,
                result: PushResult::Rejected {
                    code: code.into(),
                    message,
                },
            });
            return;
        }
        self.queued.push_back((id, tx));
        self.next_commit();
    }

    /// Hands the queued pushes to the driver in one [`Task::Commit`] once the previous one
    /// is answered: pushes commit in the order they came, and a failed commit is never
    /// followed by a later push of the same session.
    fn next_commit(&mut self) {
        if self.committing > 0 || self.queued.is_empty() {
            return;
        }
        let (mut ids, mut txs, mut bytes) = (Vec::new(), Vec::new(), 0);
        while let Some((_, tx)) = self.queued.front() {
            let size = sesame_proto::codec::encoded_len(tx);
            if !txs.is_empty()
                && (txs.len() >= PUSHES_PER_COMMIT_MAX || bytes + size > PUSH_BYTES_PER_COMMIT_MAX)
            {
                break;
            }
            let (id, tx) = self.queued.pop_front().expect("front exists");
            bytes += size;
            ids.push(id);
            txs.push(tx);
        }
        self.committing = ids.len();
        self.tasks.push_back(Task::Commit { ids, txs });
    }

    /// The outcome of a [`Task::Commit`], one result per push in its order. A push whose
    /// outcome is unknown ends the session after its answer: the client pushes again, in
    /// order, from its first unacknowledged transaction (the `(client_id, seq)` makes that
    /// safe), and nothing pushed after it may commit before that.
    pub fn pushed(&mut self, results: Vec<(u64, PushResult)>) {
        self.committing = 0;
        let mut unknown = false;
        for (id, result) in results {
            unknown |= matches!(result, PushResult::Unknown { .. });
            self.out.push_back(ServerMsg::Acked { id, result });
        }
        if unknown {
            let left = self.queued.len();
            self.close(
                "retry",
                format!(
                    "a push did not commit for sure; {left} later pushes were not committed: \
                     reconnect and push again from the first unacknowledged one"
                ),
            );
        } else {
            self.next_commit();
        }
    }

    /// Tuples of a [`Task::CatchUp`] read, all from one store snapshot at index `at`:
    /// `snapshot` says whether they are the target's whole content (from nothing) or its
    /// changes after `since`. Call it once per page; `last` on the final page makes the
    /// subscription live from `at`.
    pub fn catch_up(
        &mut self,
        sub: u32,
        at: LogIndex,
        snapshot: bool,
        tuples: Vec<SyncTuple>,
        last: bool,
    ) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return; // unsubscribed meanwhile
        };
        if s.position != Position::CatchingUp {
            return;
        }
        let mut chunks: Vec<Vec<SyncTuple>> = Vec::new();
        let mut tuples = tuples.into_iter().peekable();
        while tuples.peek().is_some() {
            chunks.push(tuples.by_ref().take(TUPLES_PER_MESSAGE_MAX).collect());
        }
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let n = chunks.len();
        for (i, tuples) in chunks.into_iter().enumerate() {
            let final_part = last && i + 1 == n;
            if snapshot {
                self.out.push_back(ServerMsg::Snapshot {
                    sub,
                    at,
                    tuples,
                    last: final_part,
                });
            } else if !tuples.is_empty() || final_part {
                // A change page's tuples only count once the last one says the
                // subscription reached `at`: until then the client holds `since`.
                self.out.push_back(ServerMsg::Changes {
                    sub,
                    through: if final_part { at } else { 0 },
                    tuples,
                });
            }
        }
        if last {
            s.position = Position::Live(at);
        }
    }

    /// A catch-up that cannot be done (the site is gone, the node is behind the client):
    /// the subscription ends and the client is told why.
    pub fn catch_up_failed(&mut self, sub: u32, reason: impl Into<String>) {
        if self.subs.remove(&sub).is_some() {
            self.out.push_back(ServerMsg::Resync {
                sub,
                reason: reason.into(),
            });
        }
    }

    /// Changes the node applied. Batches come in order, each starting where the last ended;
    /// one that does not (the driver dropped some for a slow session) ends every live
    /// subscription with a resync.
    pub fn commit(&mut self, batch: &Arc<Batch>) {
        if !matches!(self.state, State::Open { .. }) {
            return;
        }
        let contiguous = self.feed_at.is_none_or(|at| batch.from <= at);
        if !contiguous {
            self.lost_changes("the session fell behind the node's commits");
        }
        self.feed_at = Some(batch.through);
        let State::Open { client_id, .. } = &self.state else {
            return;
        };
        for (&id, sub) in self.subs.iter_mut() {
            let Position::Live(through) = sub.position else {
                continue;
            };
            if batch.through <= through {
                continue;
            }
            let tuples: Vec<SyncTuple> = batch
                .changes
                .iter()
                .filter(|c| c.index > through && matches(&sub.target, client_id, c))
                .map(sync_tuple)
                .collect();
            sub.position = Position::Live(batch.through);
            if tuples.is_empty() {
                continue; // the client learns `through` with the next change it follows
            }
            let mut chunks = tuples.chunks(TUPLES_PER_MESSAGE_MAX).peekable();
            while let Some(chunk) = chunks.next() {
                self.out.push_back(ServerMsg::Changes {
                    sub: id,
                    through: if chunks.peek().is_none() {
                        batch.through
                    } else {
                        0
                    },
                    tuples: chunk.to_vec(),
                });
            }
        }
    }

    /// The driver could not keep this session's batches (its queue was full): every live
    /// subscription ends with a resync; subscriptions still catching up are unaffected
    /// (their snapshot is read after the loss).
    pub fn lost_changes(&mut self, reason: &str) {
        let live: Vec<u32> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(s.position, Position::Live(_)))
            .map(|(id, _)| *id)
            .collect();
        for sub in live {
            self.subs.remove(&sub);
            self.out.push_back(ServerMsg::Resync {
                sub,
                reason: reason.into(),
            });
        }
    }

    /// Messages waiting to be sent.
    pub fn backlog(&self) -> usize {
        self.out.len()
    }
}

/// One page of a subscription's catch-up, read from one store snapshot at index `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct CatchUpPage {
    pub at: LogIndex,
    /// The target's whole content (from nothing), or its changes after `since`.
    pub snapshot: bool,
    pub tuples: Vec<SyncTuple>,
    pub last: bool,
}

/// Tuples per store read of a catch-up (and per message).
pub const CATCH_UP_PAGE: usize = TUPLES_PER_MESSAGE_MAX;

/// Reads a subscription's catch-up from one snapshot (`view`), page by page into `emit`:
/// every tuple of the target when `since` is 0 or older than the site's feed horizon
/// ([`crate::View::feed_horizon`]: tombstones before it were compacted away, or the site was
/// made again), else the target's changes after `since` (each key's latest change).
/// Hand each page to [`ServerSession::catch_up`].
pub fn read_catch_up<E: From<String>>(
    view: crate::View<'_>,
    target: &Target,
    client_id: &str,
    since: LogIndex,
    mut emit: impl FnMut(CatchUpPage) -> Result<(), E>,
) -> Result<(), E> {
    let err = |e: crate::StoreError| E::from(e.to_string());
    let at = view.applied_index().map_err(err)?;
    if view.site(target.site()).map_err(err)?.is_none() {
        return Err(E::from(format!("site {:?} does not exist", target.site())));
    }
    if since == 0 || since < view.feed_horizon(target.site()).map_err(err)? {
        let (collection, prefix, mailbox) = match target {
            Target::Site {
                collection, prefix, ..
            } => (collection.as_deref(), prefix.as_str(), None),
            Target::Mailbox { .. } => (None, "", Some(client_id)),
        };
        let mut after: Option<(String, String)> = None;
        loop {
            let tuples = view
                .scan_tuples(
                    target.site(),
                    collection,
                    prefix,
                    mailbox,
                    after.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                    CATCH_UP_PAGE,
                )
                .map_err(err)?;
            let last = tuples.len() < CATCH_UP_PAGE;
            after = tuples.last().map(|t| (t.collection.clone(), t.key.clone()));
            emit(CatchUpPage {
                at,
                snapshot: true,
                tuples: tuples.into_iter().map(tuple_to_sync).collect(),
                last,
            })?;
            if last {
                return Ok(());
            }
        }
    }
    let mut from = since;
    loop {
        let page = view
            .changes(Some(target.site()), from, CATCH_UP_PAGE)
            .map_err(err)?;
        let last = page.next_since >= at || page.changes.is_empty();
        let tuples = page
            .changes
            .iter()
            .filter(|c| matches(target, client_id, c))
            .map(sync_tuple)
            .collect();
        emit(CatchUpPage {
            at,
            snapshot: false,
            tuples,
            last,
        })?;
        if last {
            return Ok(());
        }
        from = page.next_since;
    }
}

/// Whether `change` belongs to `target` for client `client_id`.
pub fn matches(target: &Target, client_id: &str, change: &Change) -> bool {
    match target {
        Target::Site {
            site,
            collection,
            prefix,
        } => {
            change.site == *site
                && change.home == Home::Site
                && collection.as_ref().is_none_or(|c| *c == change.collection)
                && change.key.starts_with(prefix.as_str())
        }
        Target::Mailbox { site } => {
            change.site == *site && matches!(&change.home, Home::Mailbox(to) if to == client_id)
        }
    }
}

/// A change as the protocol carries it.
pub fn sync_tuple(c: &Change) -> SyncTuple {
    SyncTuple {
        collection: c.collection.clone(),
        key: c.key.clone(),
        value: c.value.clone(),
        version: c.index,
        origin: c.origin.clone(),
        home: c.home.clone(),
    }
}

/// A live tuple as the protocol carries it.
pub fn tuple_to_sync(t: Tuple) -> SyncTuple {
    SyncTuple {
        collection: t.collection,
        key: t.key,
        value: Some(t.value),
        version: t.version,
        origin: t.origin,
        home: t.home,
    }
}

/// The receipt a recipient's node writes into the sender's mailbox when a mailbox tuple is
/// delivered: collection [`RECEIPTS_COLLECTION`], key `<collection>/<key>`.
pub fn receipt(
    site: &str,
    recipient: &str,
    sender: &str,
    collection: &str,
    key: &str,
    version: LogIndex,
    delivered_at_ms: u64,
) -> Transaction {
    let value = sesame_proto::Value::from_json(serde_json::json!({
        "to": recipient,
        "collection": collection,
        "key": key,
        "version": version,
        "delivered_at_ms": delivered_at_ms,
    }))
    .expect("a receipt is a plain JSON object");
    Transaction {
        site: site.to_string(),
        ops: vec![Op::Send {
            to: sender.to_string(),
            collection: RECEIPTS_COLLECTION.to_string(),
            key: format!("{collection}/{key}"),
            value,
        }],
        origin: None,
    }
}

/// Where delivery receipts go (in the sender's mailbox).
pub const RECEIPTS_COLLECTION: &str = "_receipts";
