//! Drives one client connection: one bidirectional QUIC stream of length-prefixed frames,
//! through a [`ServerSession`].

use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use sesame_proto::sync::{encode_prefixed, FrameReader, PushResult, Target};
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
const WRITE_WAIT: Duration = Duration::from_secs(15);
/// Longest a catch-up waits for this node to reach the index the client has seen.
const BEHIND_WAIT: Duration = Duration::from_secs(5);
/// Frames read ahead of the session.
const FRAMES_AHEAD: usize = 16;

/// Serves a client connection until it closes, the session ends or the node stops.
pub async fn serve(conn: Connection, ctx: Arc<ClientContext>, cancel: CancellationToken) {
    let stream = tokio::time::timeout(HELLO_WAIT, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = stream else {
        conn.close(1u32.into(), b"no stream opened");
        return;
    };
    let mut driver = Driver {
        ctx,
        session: ServerSession::new(0),
        send,
        membership: None,
        commits: mpsc::channel(1),
    };
    driver.session = ServerSession::new(driver.ctx.node_id);
    let (frames_tx, frames) = mpsc::channel(FRAMES_AHEAD);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let end = driver.run(frames, cancel).await;
    reader.abort();
    let _ = driver.send.finish();
    // Let the last frames (an error, say) leave before closing.
    let _ = tokio::time::timeout(Duration::from_secs(2), driver.send.stopped()).await;
    conn.close(0u32.into(), end.as_bytes());
}

/// Reads frames off the stream; the last item is why reading stopped.
async fn read_frames(mut recv: RecvStream, out: mpsc::Sender<Result<Vec<u8>, String>>) {
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                reader.push(&buf[..n]);
                loop {
                    match reader.next_frame() {
                        Ok(Some(frame)) => {
                            if out.send(Ok(frame)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = out.send(Err(e.to_string())).await;
                            return;
                        }
                    }
                }
            }
            Ok(None) => {
                let _ = out.send(Err("the client closed its stream".into())).await;
                return;
            }
            Err(e) => {
                let _ = out.send(Err(format!("read: {e}"))).await;
                return;
            }
        }
    }
}

/// The outcome of one commit of pushes: (push id, result) in push order.
type PushResults = Vec<(u64, PushResult)>;

struct Driver {
    ctx: Arc<ClientContext>,
    session: ServerSession,
    send: SendStream,
    membership: Option<Membership>,
    /// Outcomes of the commit in flight (at most one).
    commits: (mpsc::Sender<PushResults>, mpsc::Receiver<PushResults>),
}

impl Driver {
    async fn run(
        &mut self,
        mut frames: mpsc::Receiver<Result<Vec<u8>, String>>,
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
                frame = frames.recv() => match frame {
                    Some(Ok(frame)) => self.session.receive(&frame),
                    Some(Err(e)) => {
                        if e.contains("over the limit") {
                            self.session.close("too_large", e);
                        } else {
                            return e;
                        }
                    }
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
                    let access = authenticate(&self.ctx, &token).await;
                    if access.is_ok() {
                        tracing::debug!(%client_id, "client session open");
                        self.membership = Some(self.ctx.feed.join());
                    }
                    let at = self.membership.as_ref().map_or(0, |m| m.at);
                    self.session
                        .authenticated(access, self.ctx.reads.applied_index(), at);
                }
                Task::CatchUp { sub, target, since } => self.catch_up(sub, target, since).await?,
                Task::Commit { ids, txs } => {
                    let writer = self.ctx.writer.clone();
                    let out = self.commits.0.clone();
                    tokio::spawn(async move {
                        let results = commit(&writer, txs).await;
                        let _ = out.send(ids.into_iter().zip(results).collect()).await;
                    });
                }
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
            }
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        while let Some(msg) = self.session.poll_transmit() {
            let bytes = encode_prefixed(&msg);
            match tokio::time::timeout(WRITE_WAIT, self.send.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("write: {e}")),
                Err(_) => return Err("the client does not read".into()),
            }
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
