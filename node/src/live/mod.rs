//! Live pages: browsers connect to the node over a WebRTC data channel and speak the client
//! sync protocol on it (JSON messages, one per data-channel message), driven by the same
//! session code as app clients over QUIC (`crate::clients::session`).
//!
//! Signalling is one request: `POST /v1/rtc` with `{"type": "offer", "sdp", "site"}` answers
//! `{"type": "answer", "sdp"}` once the node's host candidates are gathered (no trickle, no
//! STUN: the node is reachable at its own address). With a bearer token the session has the
//! token's rights; without one it is a visitor of `site`, with what the site's grant
//! (`_live/grants`) allows and nothing else.
//!
//! Everything from the open web is bounded: offer size, offers in flight, data channels in
//! all and per address, message size (a larger or malformed message closes that channel),
//! time to open the channel, and what one session may hold (`sesame_sync::server`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sesame_proto::sync::{ClientMsg, ServerMsg};
use sesame_sync::server::{Access, Grant, GRANT_COLLECTION, GRANT_KEY};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use crate::clients::session::{self, Inbound, Outbound, FRAMES_AHEAD};
use crate::clients::ClientContext;

/// Largest offer SDP accepted, in bytes.
pub const OFFER_BYTES_MAX: usize = 32 << 10;
/// Offers being answered at once; more wait (briefly) or are refused.
pub const OFFERS_IN_FLIGHT_MAX: usize = 16;
/// Data channels (peer connections) a node holds at once.
pub const CHANNELS_MAX: usize = 1_000;
/// Data channels one address may hold.
pub const CHANNELS_PER_ADDRESS_MAX: usize = 8;
/// Largest message a browser may send, in bytes; a larger one closes its channel.
pub const MESSAGE_BYTES_MAX: usize = 16 << 10;
/// Longest an answered offer may take to open its data channel before it is dropped.
const OPEN_WAIT: Duration = Duration::from_secs(15);
/// Longest the node gathers its candidates for an answer.
const GATHER_WAIT: Duration = Duration::from_secs(3);
/// A browser that does not take what is sent within this long is dropped.
const SEND_WAIT: Duration = Duration::from_secs(10);
/// Bytes a channel may have unsent before sends wait (then time out).
const SEND_BUFFER_BYTES: usize = 1 << 20;
/// A session that says nothing for this long is closed (live.js pings every 20 s).
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// Why an offer was not answered.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// The node's WebRTC side.
pub struct Live {
    ctx: Arc<ClientContext>,
    /// Where the node's host candidates are: its HTTP address, any port.
    ip: IpAddr,
    offers: Semaphore,
    channels: Mutex<Channels>,
    /// Form posts per address (visitors without JavaScript), bounded in size.
    form_posts: Mutex<HashMap<IpAddr, (f64, std::time::Instant)>>,
    cancel: CancellationToken,
}

/// Addresses whose form posts are counted at once; past it the oldest are forgotten.
const FORM_ADDRESSES_MAX: usize = 10_000;

#[derive(Default)]
struct Channels {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// A data channel's place in the counts; given back when it goes.
struct Slot {
    live: Arc<Live>,
    from: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.live.channels.lock().expect("channels lock poisoned");
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.from);
            }
        }
    }
}

impl Live {
    pub fn new(ctx: Arc<ClientContext>, ip: IpAddr, cancel: CancellationToken) -> Arc<Live> {
        Arc::new(Live {
            ctx,
            ip,
            offers: Semaphore::new(OFFERS_IN_FLIGHT_MAX),
            channels: Mutex::new(Channels::default()),
            form_posts: Mutex::new(HashMap::new()),
            cancel,
        })
    }

    /// Takes one of `from`'s form posts (at most `per_minute`), or says it must wait.
    pub fn take_post(
        &self,
        from: IpAddr,
        per_minute: u32,
    ) -> Result<(), crate::http::error::ApiError> {
        let now = std::time::Instant::now();
        let mut posts = self.form_posts.lock().expect("form posts lock poisoned");
        if posts.len() >= FORM_ADDRESSES_MAX && !posts.contains_key(&from) {
            let minute_ago = now - Duration::from_secs(60);
            posts.retain(|_, (_, at)| *at > minute_ago);
            if posts.len() >= FORM_ADDRESSES_MAX {
                return Err(crate::http::error::ApiError::unavailable(
                    "too many visitors are posting now; try again shortly",
                ));
            }
        }
        let cap = f64::from(per_minute.max(1));
        let (tokens, at) = posts.entry(from).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * cap / 60.0).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let mut e = crate::http::error::ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("at most {per_minute} posts a minute; try again shortly"),
            );
            e.retry_after = Some(60 / u64::from(per_minute.max(1)));
            Err(e)
        }
    }

    /// Data channels open (or being opened) now.
    pub fn channels(&self) -> usize {
        self.channels.lock().expect("channels lock poisoned").total
    }

    fn take_slot(self: &Arc<Live>, from: IpAddr) -> Result<Slot, OfferError> {
        let mut c = self.channels.lock().expect("channels lock poisoned");
        if c.total >= CHANNELS_MAX {
            return Err(OfferError::Busy(format!(
                "this node holds {CHANNELS_MAX} live connections already"
            )));
        }
        let n = c.per_address.entry(from).or_default();
        if *n >= CHANNELS_PER_ADDRESS_MAX {
            return Err(OfferError::Busy(format!(
                "{from} holds {CHANNELS_PER_ADDRESS_MAX} live connections already"
            )));
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            live: self.clone(),
            from,
        })
    }

    /// What a visitor of `site` may do: the site's grant, or nothing.
    pub async fn visitor(&self, site: &str) -> Result<Access, OfferError> {
        let name = site.to_string();
        let grant = self
            .ctx
            .reads
            .read(move |v| {
                if v.site(&name)?.is_none() {
                    return Ok(None);
                }
                Ok(Some(v.get(&name, GRANT_COLLECTION, GRANT_KEY)?))
            })
            .await
            .map_err(|e| OfferError::Failed(e.to_string()))?;
        match grant {
            None => Err(OfferError::Bad(format!("site {site:?} does not exist"))),
            Some(None) => Ok(Access::Visitor(Grant {
                site: site.to_string(),
                ..Grant::default()
            })),
            Some(Some(t)) => Ok(Access::Visitor(Grant::from_value(site, &t.value))),
        }
    }

    /// Answers a browser's offer: a peer connection whose data channel will run a session
    /// with `access`. Returns the answer SDP.
    pub async fn answer(
        self: &Arc<Live>,
        offer_sdp: String,
        access: Access,
        from: SocketAddr,
    ) -> Result<String, OfferError> {
        if offer_sdp.len() > OFFER_BYTES_MAX {
            return Err(OfferError::Bad(format!(
                "the offer is {} bytes, the limit is {OFFER_BYTES_MAX}",
                offer_sdp.len()
            )));
        }
        let _permit = tokio::time::timeout(Duration::from_secs(2), self.offers.acquire())
            .await
            .map_err(|_| OfferError::Busy("too many offers at once; retry shortly".into()))?
            .map_err(|_| OfferError::Busy("the node is stopping".into()))?;
        let slot = self.take_slot(from.ip())?;
        let offer = RTCSessionDescription::offer(offer_sdp)
            .map_err(|e| OfferError::Bad(format!("invalid offer: {e}")))?;

        let (gathered_tx, mut gathered) = mpsc::channel(1);
        let (channel_tx, mut channel) = mpsc::channel(1);
        let (state_tx, mut state) = mpsc::channel(8);
        let handler = Arc::new(Handler {
            gathered: gathered_tx,
            channel: channel_tx,
            state: state_tx,
        });
        // A browser that goes away without a word (a closed laptop) is noticed within
        // seconds: its presence counts down, its slot is given back.
        let settings = SettingEngineBuilder::new()
            // ICE lite (RFC 8445 2.7): the node is reachable at its host address, so it
            // answers the browser's checks and makes none of its own.
            .with_lite(true)
            .with_ice_timeouts(
                Some(Duration::from_secs(4)),
                Some(Duration::from_secs(8)),
                Some(Duration::from_secs(1)),
            )
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .with_handler(handler)
            .with_udp_addrs(vec![SocketAddr::new(self.ip, 0)])
            .with_data_channel_send_buffer_limit(SEND_BUFFER_BYTES)
            .build()
            .await
            .map_err(|e| OfferError::Failed(format!("make a peer connection: {e}")))?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let fail =
            |what: &str, e: &dyn std::fmt::Display| OfferError::Failed(format!("{what}: {e}"));
        let answered = async {
            pc.set_remote_description(offer)
                .await
                .map_err(|e| OfferError::Bad(format!("the offer does not apply: {e}")))?;
            let answer = pc
                .create_answer(None)
                .await
                .map_err(|e| fail("make the answer", &e))?;
            pc.set_local_description(answer)
                .await
                .map_err(|e| fail("set the answer", &e))?;
            let _ = tokio::time::timeout(GATHER_WAIT, gathered.recv()).await;
            pc.local_description()
                .await
                .map(|d| d.sdp)
                .ok_or_else(|| OfferError::Failed("no local description".into()))
        }
        .await;
        let sdp = match answered {
            Ok(sdp) => sdp,
            Err(e) => {
                let _ = pc.close().await;
                return Err(e);
            }
        };

        // The connection lives on its own from here: until its channel's session ends, it
        // fails, or it never opens.
        let live = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let opened = tokio::select! {
                dc = channel.recv() => dc,
                _ = tokio::time::sleep(OPEN_WAIT) => None,
                _ = failed(&mut state) => None,
                _ = live.cancel.cancelled() => None,
            };
            if let Some(dc) = opened {
                tokio::select! {
                    _ = run_channel(live.ctx.clone(), dc, access, live.cancel.clone()) => {}
                    _ = failed(&mut state) => {}
                }
            }
            let _ = pc.close().await;
        });
        Ok(sdp)
    }
}

/// Resolves when the peer connection has failed or closed.
async fn failed(state: &mut mpsc::Receiver<RTCPeerConnectionState>) {
    while let Some(s) = state.recv().await {
        if matches!(
            s,
            RTCPeerConnectionState::Failed
                | RTCPeerConnectionState::Closed
                | RTCPeerConnectionState::Disconnected
        ) {
            return;
        }
    }
    std::future::pending::<()>().await
}

struct Handler {
    gathered: mpsc::Sender<()>,
    channel: mpsc::Sender<Arc<dyn DataChannel>>,
    state: mpsc::Sender<RTCPeerConnectionState>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.try_send(());
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.try_send(state);
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        // One channel per connection: later ones are closed.
        if self.channel.try_send(dc.clone()).is_err() {
            let _ = dc.close().await;
        }
    }
}

/// The session's messages to the browser: JSON text, one per data-channel message.
struct ChannelOut(Arc<dyn DataChannel>);

impl Outbound for ChannelOut {
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), String> {
        let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        match tokio::time::timeout(SEND_WAIT, self.0.send_text(&text)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("send: {e}")),
            Err(_) => Err("the browser does not take what is sent".into()),
        }
    }
}

/// Runs the sync session on an open data channel until either side ends it.
async fn run_channel(
    ctx: Arc<ClientContext>,
    dc: Arc<dyn DataChannel>,
    access: Access,
    cancel: CancellationToken,
) {
    let (inbound_tx, inbound) = mpsc::channel::<Inbound>(FRAMES_AHEAD);
    let reader = {
        let dc = dc.clone();
        tokio::spawn(async move {
            let fail = |code: &str, m: String| Err((code.to_string(), m));
            loop {
                let event = match tokio::time::timeout(IDLE_WAIT, dc.poll()).await {
                    Ok(Some(e)) => e,
                    Ok(None) => {
                        let _ = inbound_tx
                            .send(fail("closed", "the channel closed".into()))
                            .await;
                        return;
                    }
                    Err(_) => {
                        let _ = inbound_tx
                            .send(fail("idle", "nothing heard for a minute".into()))
                            .await;
                        return;
                    }
                };
                let msg = match event {
                    DataChannelEvent::OnMessage(m) if m.data.len() > MESSAGE_BYTES_MAX => fail(
                        "too_large",
                        format!(
                            "a message of {} bytes is over the limit of {MESSAGE_BYTES_MAX}",
                            m.data.len()
                        ),
                    ),
                    DataChannelEvent::OnMessage(m) => serde_json::from_slice::<ClientMsg>(&m.data)
                        .map_err(|e| ("bad_frame".to_string(), format!("not a message: {e}"))),
                    DataChannelEvent::OnClose => fail("closed", "the channel closed".into()),
                    _ => continue,
                };
                let last = msg.is_err();
                if inbound_tx.send(msg).await.is_err() || last {
                    return;
                }
            }
        })
    };
    let mut out = ChannelOut(dc.clone());
    let end = session::drive(ctx, &mut out, inbound, Some(access), cancel).await;
    tracing::debug!("live session ended: {end}");
    reader.abort();
    // Let the last messages (an error, say) leave before closing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while dc.outstanding_bytes().await.unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = dc.close().await;
}
