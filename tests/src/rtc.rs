//! A WebRTC data-channel client in Rust, speaking the sync protocol's JSON form the way
//! `live.js` does: for tests and the benchmark (hundreds of channels without a browser).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sesame_proto::sync::{ClientMsg, ServerMsg};
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCSessionDescription,
};

pub struct RtcClient {
    pc: Arc<dyn PeerConnection>,
    dc: Arc<dyn DataChannel>,
    incoming: mpsc::Receiver<Result<ServerMsg, String>>,
    _reader: tokio::task::JoinHandle<()>,
}

struct Gathered(mpsc::Sender<()>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Gathered {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.0.try_send(());
        }
    }
}

impl RtcClient {
    /// Offers a data channel to `url`'s node for `site` (a visitor when `token` is `None`)
    /// and waits for it to open.
    pub async fn connect(url: &str, site: &str, token: Option<&str>) -> anyhow::Result<RtcClient> {
        RtcClient::connect_from(url, site, token, "127.0.0.1".parse()?).await
    }

    /// Like [`RtcClient::connect`], from local address `ip` (a loopback address other than
    /// 127.0.0.1 looks like another visitor to the node's per-address limits).
    pub async fn connect_from(
        url: &str,
        site: &str,
        token: Option<&str>,
        ip: std::net::IpAddr,
    ) -> anyhow::Result<RtcClient> {
        let (gathered_tx, mut gathered) = mpsc::channel(1);
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_handler(Arc::new(Gathered(gathered_tx)))
            .with_udp_addrs(vec![std::net::SocketAddr::new(ip, 0)])
            .build()
            .await
            .context("make a peer connection")?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let dc = pc.create_data_channel("sesame", None).await?;
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), gathered.recv()).await;
        let offer = pc.local_description().await.context("no offer")?;
        let mut req = reqwest::Client::builder()
            .local_address(ip)
            .build()?
            .post(format!("{url}/v1/rtc"))
            .json(&serde_json::json!({"type": "offer", "sdp": offer.sdp, "site": site}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "offer refused: {status} {body}");
        let sdp = body["sdp"].as_str().context("no sdp in the answer")?;
        anyhow::ensure!(body["type"] == "answer", "not an answer: {body}");
        pc.set_remote_description(RTCSessionDescription::answer(sdp.to_string())?)
            .await?;

        let (tx, incoming) = mpsc::channel(1024);
        let (open_tx, mut open) = mpsc::channel(1);
        let reader = {
            let dc = dc.clone();
            tokio::spawn(async move {
                while let Some(event) = dc.poll().await {
                    match event {
                        DataChannelEvent::OnOpen => {
                            let _ = open_tx.try_send(());
                        }
                        DataChannelEvent::OnMessage(m) => {
                            let msg = serde_json::from_slice::<ServerMsg>(&m.data)
                                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&m.data)));
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                        DataChannelEvent::OnClose => {
                            let _ = tx.send(Err("closed".into())).await;
                            return;
                        }
                        _ => {}
                    }
                }
                let _ = tx.send(Err("closed".into())).await;
            })
        };
        tokio::time::timeout(Duration::from_secs(10), open.recv())
            .await
            .context("the data channel did not open within 10 s")?;
        Ok(RtcClient {
            pc,
            dc,
            incoming,
            _reader: reader,
        })
    }

    pub async fn send(&self, msg: &ClientMsg) -> anyhow::Result<()> {
        self.dc.send_text(&serde_json::to_string(msg)?).await?;
        Ok(())
    }

    /// Sends raw text (for hostile messages).
    pub async fn send_raw(&self, text: &str) -> anyhow::Result<()> {
        self.dc.send_text(text).await?;
        Ok(())
    }

    /// The next message, within `wait`; `Err` when the channel closed.
    pub async fn recv(&mut self, wait: Duration) -> anyhow::Result<ServerMsg> {
        match tokio::time::timeout(wait, self.incoming.recv()).await {
            Ok(Some(Ok(msg))) => Ok(msg),
            Ok(Some(Err(e))) => anyhow::bail!("{e}"),
            Ok(None) => anyhow::bail!("closed"),
            Err(_) => anyhow::bail!("nothing within {wait:?}"),
        }
    }

    /// Says hello and waits for the welcome.
    pub async fn hello(&mut self, client_id: &str) -> anyhow::Result<()> {
        self.send(&ClientMsg::Hello {
            version: sesame_proto::sync::SYNC_PROTOCOL_VERSION,
            token: String::new(),
            client_id: client_id.into(),
        })
        .await?;
        match self.recv(Duration::from_secs(10)).await? {
            ServerMsg::Welcome { .. } => Ok(()),
            other => anyhow::bail!("expected a welcome, got {other:?}"),
        }
    }

    pub async fn close(self) {
        let _ = self.dc.close().await;
        // The channel's close goes out before the connection's.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.pc.close().await;
        self._reader.abort();
    }
}
