//! Drives one client session through a [`ServerSession`], over any transport: a QUIC stream
//! of length-prefixed bincode frames ([`serve`], app clients) or a browser's data channel of
//! JSON messages (`crate::live`). The transport gives the driver decoded messages and an
//! [`Outbound`] to send with; everything else — rights, catch-up, pushes, presence, versions
//! — is the same code.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use sesame_proto::sync::{encode_prefixed, ClientMsg, FrameReader, PushResult, ServerMsg, Target};
use sesame_proto::{CommandResult, Home, LogIndex, Transaction};
use sesame_sync::server::{self, Access, CatchUpPage, ServerSession, Task};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::feed::Membership;
use super::ClientContext;
use crate::app::now_ms;
use crate::http::auth::{check_token, hash_token};

/// Longest a client may take to open its stream and say hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// Longest one frame may take to be written to a client that does not read.
pub const WRITE_WAIT: Duration = Duration::from_secs(15);
/// Longest a catch-up waits for this node to reach the index the client has seen.
const BEHIND_WAIT: Duration = Duration::from_secs(5);
/// Messages read ahead of the session.
pub const FRAMES_AHEAD: usize = 16;
/// Presence counts and version notes waiting for the session; past it the oldest wait (the
/// next note carries the newer count anyway).
const NOTES_MAX: usize = 64;

/// A message from the client, decoded by its transport, or why the transport ended.
pub type Inbound = Result<ClientMsg, (String, String)>;

/// How a session's messages leave, whatever the transport.
pub trait Outbound: Send {
    fn send(&mut self, msg: &ServerMsg) -> impl Future<Output = Result<(), String>> + Send;
}

/// QUIC: one length-prefixed frame per message.
struct QuicOut(SendStream);

impl Outbound for QuicOut {
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), String> {
        let bytes = encode_prefixed(msg);
        match tokio::time::timeout(WRITE_WAIT, self.0.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("the client does not read".into()),
        }
    }
}

/// Serves a client connection until it closes, the session ends or the node stops.
pub async fn serve(conn: Connection, ctx: Arc<ClientContext>, cancel: CancellationToken) {
    let stream = tokio::time::timeout(HELLO_WAIT, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = stream else {
        conn.close(1u32.into(), b"no stream opened");
        return;
    };
    let (frames_tx, frames) = mpsc::channel(FRAMES_AHEAD);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let mut out = QuicOut(send);
    let end = drive(ctx, &mut out, frames, None, cancel).await;
    reader.abort();
    let _ = out.0.finish();
    // Let the last frames (an error, say) leave before closing.
    let _ = tokio::time::timeout(Duration::from_secs(2), out.0.stopped()).await;
    conn.close(0u32.into(), end.as_bytes());
}

/// Reads frames off the stream and decodes them; the last item is why reading stopped.
async fn read_frames(mut recv: RecvStream, out: mpsc::Sender<Inbound>) {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let fail = |code: &str, e: String| Err((code.to_string(), e));
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                reader.push(&buf[..n]);
                loop {
                    let msg = match reader.next_frame() {
                        Ok(Some(frame)) => match sesame_proto::sync::decode::<ClientMsg>(&frame) {
                            Ok(msg) => Ok(msg),
                            Err(e) => fail("bad_frame", format!("cannot decode the message: {e}")),
                        },
                        Ok(None) => break,
                        Err(e) => fail("too_large", e.to_string()),
                    };
                    let last = msg.is_err();
                    if out.send(msg).await.is_err() || last {
                        return;
                    }
                }
            }
            Ok(None) => {
                let _ = out
                    .send(fail("closed", "the client closed its stream".into()))
                    .await;
                return;
            }
            Err(e) => {
                let _ = out.send(fail("closed", format!("read: {e}"))).await;
                return;
            }
        }
    }
}

/// Runs one session until it ends; returns why. `access`, when given, is what the
/// transport already established (a data channel's offer was authorised when it was made),
/// and the hello's token is not looked at again.
pub async fn drive<O: Outbound>(
    ctx: Arc<ClientContext>,
    out: &mut O,
    inbound: mpsc::Receiver<Inbound>,
    access: Option<Access>,
    cancel: CancellationToken,
) -> String {
    let (notes_tx, notes) = mpsc::channel(NOTES_MAX);
    let mut driver = Driver {
        session: ServerSession::new(ctx.node_id),
        ctx,
        out,
        membership: None,
        commits: mpsc::channel(1),
        access,
        notes_tx,
        watchers: Vec::new(),
        posts: PostBudget::default(),
    };
    driver.run(inbound, notes, cancel).await
}

/// The outcome of one commit of pushes: (push id, result) in push order.
type PushResults = Vec<(u64, PushResult)>;

/// A visitor's posts: at most the grant's number per minute (a token bucket).
#[derive(Default)]
struct PostBudget {
    tokens: f64,
    at: Option<Instant>,
}

impl PostBudget {
    fn take(&mut self, per_minute: u32) -> bool {
        let now = Instant::now();
        let rate = f64::from(per_minute) / 60.0;
        let cap = f64::from(per_minute.max(1));
        self.tokens = match self.at {
            None => cap,
            Some(at) => (self.tokens + now.duration_since(at).as_secs_f64() * rate).min(cap),
        };
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Stops a background task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Driver<'o, O: Outbound> {
    ctx: Arc<ClientContext>,
    session: ServerSession,
    out: &'o mut O,
    membership: Option<Membership>,
    /// Outcomes of the commit in flight (at most one).
    commits: (mpsc::Sender<PushResults>, mpsc::Receiver<PushResults>),
    access: Option<Access>,
    notes_tx: mpsc::Sender<ServerMsg>,
    /// Presence memberships and version watches of this session.
    watchers: Vec<AbortOnDrop>,
    posts: PostBudget,
}

impl<O: Outbound> Driver<'_, O> {
    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut notes: mpsc::Receiver<ServerMsg>,
        cancel: CancellationToken,
    ) -> String {
        loop {
            if let Err(e) = self.work().await {
                return e;
            }
            if self.session.is_closed() {
                return "session ended".into();
            }
            let batches = async {
                match self.membership.as_mut() {
                    Some(m) => m.batches.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.session.close("shutting_down", "the node is stopping");
                }
                msg = inbound.recv() => match msg {
                    Some(Ok(msg)) => self.session.handle(msg),
                    Some(Err((code, message))) if code == "closed" => return message,
                    Some(Err((code, message))) => self.session.close(&code, message),
                    None => return "reader stopped".into(),
                },
                batch = batches => match batch {
                    Some(batch) => self.session.commit(&batch),
                    None => return "the feed stopped".into(),
                },
                results = self.commits.1.recv() => {
                    if let Some(results) = results {
                        self.session.pushed(results);
                    }
                }
                Some(note) = notes.recv() => self.session.notify(note),
            }
        }
    }

    /// Does the session's tasks and sends what it has to say.
    async fn work(&mut self) -> Result<(), String> {
        loop {
            self.flush().await?;
            let Some(task) = self.session.poll_task() else {
                return Ok(());
            };
            match task {
                Task::Authenticate { token, client_id } => {
                    let access = match &self.access {
                        Some(access) => Ok(access.clone()),
                        None => authenticate(&self.ctx, &token).await,
                    };
                    if access.is_ok() {
                        tracing::debug!(%client_id, "client session open");
                        self.membership = Some(self.ctx.feed.join());
                    }
                    let at = self.membership.as_ref().map_or(0, |m| m.at);
                    self.session
                        .authenticated(access, self.ctx.reads.applied_index(), at);
                }
                Task::CatchUp { sub, target, since } => self.catch_up(sub, target, since).await?,
                Task::Commit { ids, txs } => self.commit(ids, txs),
                Task::Deliver {
                    site,
                    collection,
                    key,
                    version,
                } => {
                    let recipient = self.session.client_id().unwrap_or_default().to_string();
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) =
                            deliver(&ctx, &site, &recipient, &collection, &key, version).await
                        {
                            tracing::debug!("mailbox receipt for {site}/{collection}/{key}: {e}");
                        }
                    });
                }
                Task::Presence { topic } => {
                    let Some(mut joined) = self.ctx.presence.join(&topic) else {
                        self.session
                            .close("limit", "this node counts too many presence topics now");
                        continue;
                    };
                    let notes = self.notes_tx.clone();
                    self.watchers.push(AbortOnDrop(tokio::spawn(async move {
                        loop {
                            let n = *joined.count().borrow_and_update();
                            let note = ServerMsg::Presence {
                                topic: topic.clone(),
                                count: n,
                            };
                            if notes.send(note).await.is_err()
                                || joined.count().changed().await.is_err()
                            {
                                return;
                            }
                        }
                    })));
                }
                Task::WatchVersion { site } => {
                    let reads = self.ctx.reads.clone();
                    let notes = self.notes_tx.clone();
                    self.watchers
                        .push(AbortOnDrop(tokio::spawn(watch_version(reads, site, notes))));
                }
            }
        }
    }

    /// Hands pushes to the write path in one entry; a visitor's are first held to the
    /// site's write rate and the grant's posts per minute.
    fn commit(&mut self, ids: Vec<u64>, txs: Vec<Transaction>) {
        if let Some(Access::Visitor(grant)) = &self.access {
            let per_minute = grant.posts_per_minute;
            let limited = !self.posts.take(per_minute)
                || self.ctx.limiter.check(&grant.site, Instant::now()).is_err();
            if limited {
                let results = ids
                    .into_iter()
                    .map(|id| {
                        (
                            id,
                            PushResult::Rejected {
                                code: "rate_limited".into(),
                                message: format!(
                                    "at most {per_minute} posts a minute; try again shortly"
                                ),
                            },
                        )
                    })
                    .collect();
                self.session.pushed(results);
                return;
            }
        }
        let writer = self.ctx.writer.clone();
        let out = self.commits.0.clone();
        tokio::spawn(async move {
            let results = commit(&writer, txs).await;
            let _ = out.send(ids.into_iter().zip(results).collect()).await;
        });
    }

    async fn flush(&mut self) -> Result<(), String> {
        while let Some(msg) = self.session.poll_transmit() {
            self.out.send(&msg).await?;
        }
        Ok(())
    }

    /// Catches subscription `sub` up from one store snapshot, streamed page by page.
    async fn catch_up(&mut self, sub: u32, target: Target, since: LogIndex) -> Result<(), String> {
        if since > self.ctx.reads.applied_index()
            && !self.ctx.reads.wait_applied(since, BEHIND_WAIT).await
        {
            self.session.catch_up_failed(
                sub,
                format!("this node has not reached index {since} yet; try another node"),
            );
            return Ok(());
        }
        let client_id = self.session.client_id().unwrap_or_default().to_string();
        let (pages_tx, mut pages) = mpsc::channel::<Result<CatchUpPage, String>>(2);
        let pool = self.ctx.reads.pool();
        let reader = tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<(), String> {
                let mut reader = pool.reader().map_err(|e| e.to_string())?;
                let snap = reader.snapshot().map_err(|e| e.to_string())?;
                server::read_catch_up(snap.view(), &target, &client_id, since, |page| {
                    pages_tx
                        .blocking_send(Ok(page))
                        .map_err(|_| "the session ended".to_string())
                })
            })();
            if let Err(e) = result {
                let _ = pages_tx.blocking_send(Err(e));
            }
        });
        while let Some(page) = pages.recv().await {
            match page {
                Ok(p) => {
                    let last = p.last;
                    self.session
                        .catch_up(sub, p.at, p.snapshot, p.tuples, p.last);
                    self.flush().await?;
                    if last {
                        break;
                    }
                }
                Err(e) => {
                    self.session.catch_up_failed(sub, e);
                    break;
                }
            }
        }
        drop(pages);
        let _ = reader.await;
        Ok(())
    }
}

/// Tells the session `site`'s published version now and whenever it changes.
async fn watch_version(reads: crate::reads::Reads, site: String, notes: mpsc::Sender<ServerMsg>) {
    let mut landmarks = reads.landmarks();
    let mut told = None;
    loop {
        let name = site.clone();
        if let Ok(Some(root)) = reads.read(move |v| v.root(&name)).await {
            if told != Some(root.index) {
                told = Some(root.index);
                let note = ServerMsg::Version {
                    site: site.clone(),
                    index: root.index,
                };
                if notes.send(note).await.is_err() {
                    return;
                }
            }
        }
        if landmarks.changed().await.is_err() {
            return;
        }
    }
}

/// Who the token belongs to.
async fn authenticate(ctx: &ClientContext, token: &str) -> Result<Access, String> {
    let hash = hash_token(token);
    if hash == ctx.admin_hash {
        return Ok(Access::Admin);
    }
    let row = ctx
        .reads
        .read(move |v| v.token(&hash))
        .await
        .map_err(|e| format!("cannot check the token now: {e}"))?
        .ok_or_else(|| "unknown token".to_string())?;
    check_token(&row, now_ms()).map_err(|e| e.message)?;
    Ok(Access::Site {
        site: row.site,
        role: row.role,
        scopes: row.scopes,
    })
}

/// Commits a session's pushes in one log entry and says how each ended.
async fn commit(writer: &crate::write::Writer, txs: Vec<Transaction>) -> Vec<PushResult> {
    let n = txs.len();
    match writer.write_txs(txs).await {
        Ok((_, results)) => results.into_iter().map(push_result).collect(),
        Err(e) => vec![
            PushResult::Unknown {
                message: e.to_string()
            };
            n
        ],
    }
}

fn push_result(r: CommandResult) -> PushResult {
    let rejected = |code: &str, message: String| PushResult::Rejected {
        code: code.into(),
        message,
    };
    match r {
        CommandResult::Committed { index } => PushResult::Committed { index },
        CommandResult::Duplicate { index } => PushResult::Duplicate { index },
        CommandResult::Conflict(c) => rejected(
            "conflict",
            format!(
                "op {}: {}/{} is at version {}",
                c.op, c.collection, c.key, c.current
            ),
        ),
        CommandResult::StaleSeq { highest } => rejected(
            "stale_seq",
            format!("this client has applied up to seq {highest}; this older seq is not known"),
        ),
        CommandResult::UnknownSite { site } => {
            rejected("not_found", format!("site {site:?} does not exist"))
        }
        other => rejected("internal", format!("unexpected result {other:?}")),
    }
}

/// Writes a delivery receipt into the sender's mailbox, once the recipient's client says it
/// has mailbox tuple `(site, collection, key)` at `version`.
async fn deliver(
    ctx: &ClientContext,
    site: &str,
    recipient: &str,
    collection: &str,
    key: &str,
    version: LogIndex,
) -> Result<(), String> {
    let (s, c, k) = (site.to_string(), collection.to_string(), key.to_string());
    let tuple = ctx
        .reads
        .read(move |v| v.get(&s, &c, &k))
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no such tuple")?;
    if tuple.home != Home::Mailbox(recipient.to_string()) || tuple.version != version {
        return Err("not this client's mailbox tuple at that version".into());
    }
    let Some(sender) = tuple.origin.map(|o| o.client_id) else {
        return Ok(()); // written without a client id: nobody to tell
    };
    let tx = server::receipt(site, recipient, &sender, collection, key, version, now_ms());
    ctx.writer.write_tx(tx).await.map_err(|e| e.to_string())?;
    Ok(())
}
