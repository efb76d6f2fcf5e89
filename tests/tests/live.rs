//! Live pages over WebRTC data channels, from a Rust client speaking what live.js speaks:
//! signalling, visitors' grants, posts, presence, versions, and hostile channels.

use std::time::Duration;

use sesame_proto::sync::{ClientMsg, PushResult, ServerMsg, Subscription, Target};
use sesame_proto::{Op, Origin, Transaction, Value};
use sesame_tests::rtc::RtcClient;
use sesame_tests::TestNode;

const WAIT: Duration = Duration::from_secs(10);

fn sub(id: u32, collection: &str) -> ClientMsg {
    ClientMsg::Subscribe(Subscription {
        id,
        target: Target::Site {
            site: "demo".into(),
            collection: Some(collection.into()),
            prefix: String::new(),
        },
        since: 0,
    })
}

async fn grant(node: &TestNode, grant: serde_json::Value) {
    node.admin()
        .put("demo", "_live", "grants", grant, None)
        .await
        .unwrap();
}

/// The next message that is not a presence or version note.
async fn next(c: &mut RtcClient) -> ServerMsg {
    loop {
        match c.recv(WAIT).await.unwrap() {
            ServerMsg::Presence { .. } | ServerMsg::Version { .. } => continue,
            m => return m,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_reads_and_posts_what_the_grant_allows() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    let admin = node.admin();
    admin.create_site("demo").await.unwrap();
    admin
        .put(
            "demo",
            "guestbook",
            "alice/1",
            serde_json::json!({"text": "first"}),
            None,
        )
        .await
        .unwrap();
    admin
        .put("demo", "secrets", "k", serde_json::json!("hidden"), None)
        .await
        .unwrap();
    let url = node.node.url();

    // Without a grant nothing is readable.
    let mut v = RtcClient::connect(&url, "demo", None).await.unwrap();
    v.hello("visitor-1").await.unwrap();
    v.send(&sub(1, "guestbook")).await.unwrap();
    assert!(matches!(next(&mut v).await, ServerMsg::Error { code, .. } if code == "forbidden"));
    v.close().await;

    grant(
        &node,
        serde_json::json!({"read": ["guestbook"], "post": {"guestbook": {"max_bytes": 200}},
                           "posts_per_minute": 3}),
    )
    .await;
    let mut v = RtcClient::connect(&url, "demo", None).await.unwrap();
    v.hello("visitor-2").await.unwrap();
    v.send(&sub(1, "guestbook")).await.unwrap();
    match next(&mut v).await {
        ServerMsg::Snapshot { tuples, last, .. } => {
            assert!(last);
            assert_eq!(tuples.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // A post: a new key only, within the size limit.
    let post = |seq: u64, key: &str, text: &str, if_version| ClientMsg::Push {
        id: seq,
        tx: Transaction {
            site: "demo".into(),
            ops: vec![Op::Put {
                collection: "guestbook".into(),
                key: key.into(),
                value: Value::from_json(serde_json::json!({"text": text})).unwrap(),
                if_version,
            }],
            origin: Some(Origin {
                client_id: "visitor-2".into(),
                seq,
            }),
        },
    };
    v.send(&post(1, "alice/2", "hello", Some(0))).await.unwrap();
    let mut acked = None;
    let mut changed = false;
    while acked.is_none() || !changed {
        match next(&mut v).await {
            ServerMsg::Acked { id: 1, result } => acked = Some(result),
            ServerMsg::Changes { tuples, .. } => {
                changed |= tuples.iter().any(|t| t.key == "alice/2")
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(acked, Some(PushResult::Committed { .. })),
        "{acked:?}"
    );
    assert_eq!(
        admin
            .get("demo", "guestbook", "alice/2")
            .await
            .unwrap()
            .value
            .to_json()["text"],
        "hello"
    );
    // Overwriting, a collection without a post grant, and an oversized post are refused.
    for (seq, msg) in [
        (2, post(2, "alice/1", "overwrite", None)),
        (3, post(3, "alice/3", &"x".repeat(500), Some(0))),
    ] {
        v.send(&msg).await.unwrap();
        match next(&mut v).await {
            ServerMsg::Acked {
                id,
                result: PushResult::Rejected { code, .. },
            } => assert_eq!((id, code.as_str()), (seq, "forbidden")),
            other => panic!("{other:?}"),
        }
    }
    // The grant allows 3 posts a minute (refused ones count too): the flood is cut off.
    let mut limited = false;
    for seq in 4..10 {
        v.send(&post(seq, &format!("alice/p{seq}"), "spam", Some(0)))
            .await
            .unwrap();
        loop {
            match next(&mut v).await {
                ServerMsg::Acked {
                    result: PushResult::Rejected { code, .. },
                    ..
                } if code == "rate_limited" => {
                    limited = true;
                    break;
                }
                ServerMsg::Acked { .. } => break,
                ServerMsg::Changes { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(limited, "a visitor's posts are rate limited");
    // Reading what the grant does not name ends the channel.
    v.send(&sub(2, "secrets")).await.unwrap();
    assert!(matches!(next(&mut v).await, ServerMsg::Error { code, .. } if code == "forbidden"));
    v.close().await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_viewers_and_versions_are_announced() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let url = node.node.url();
    let topic = "/demo/alice".to_string();
    let mut a = RtcClient::connect(&url, "demo", None).await.unwrap();
    a.hello("a").await.unwrap();
    a.send(&ClientMsg::Presence {
        topic: topic.clone(),
    })
    .await
    .unwrap();
    let count = |m: ServerMsg| match m {
        ServerMsg::Presence { count, .. } => count,
        other => panic!("{other:?}"),
    };
    assert_eq!(count(a.recv(WAIT).await.unwrap()), 1);
    let mut b = RtcClient::connect(&url, "demo", None).await.unwrap();
    b.hello("b").await.unwrap();
    b.send(&ClientMsg::Presence {
        topic: topic.clone(),
    })
    .await
    .unwrap();
    assert_eq!(count(b.recv(WAIT).await.unwrap()), 2);
    assert_eq!(count(a.recv(WAIT).await.unwrap()), 2);
    // b leaves: a sees it.
    b.close().await;
    assert_eq!(count(a.recv(WAIT).await.unwrap()), 1);

    // Versions: a new publish is announced.
    a.send(&ClientMsg::WatchVersion {
        site: "demo".into(),
    })
    .await
    .unwrap();
    let first = node
        .admin()
        .put(
            "demo",
            "_templates",
            "index.html",
            serde_json::json!({"source": "v1"}),
            None,
        )
        .await
        .unwrap();
    node.admin()
        .put(
            "demo",
            "_routes",
            "/",
            serde_json::json!({"template": "index.html"}),
            None,
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "a version note arrives"
        );
        if let ServerMsg::Version { index, .. } = a.recv(WAIT).await.unwrap() {
            if index >= first.index {
                break;
            }
        }
    }
    a.close().await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_offers_and_messages_are_bounded() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let url = node.node.url();
    let http = reqwest::Client::new();
    // Garbage offers get a 400 and hold nothing.
    for body in [
        serde_json::json!({"type": "offer", "sdp": "v=0 nonsense", "site": "demo"}),
        serde_json::json!({"type": "answer", "sdp": "", "site": "demo"}),
        serde_json::json!({"type": "offer", "sdp": "x".repeat(40_000), "site": "demo"}),
        serde_json::json!({"type": "offer", "sdp": "", "site": "no such site"}),
    ] {
        let r = http
            .post(format!("{url}/v1/rtc"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    }
    assert_eq!(node.node.node.live.channels(), 0);

    // One address holds at most 8 channels; the ninth offer is refused.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(RtcClient::connect(&url, "demo", None).await.unwrap());
    }
    let ninth = RtcClient::connect(&url, "demo", None)
        .await
        .err()
        .expect("refused");
    assert!(ninth.to_string().contains("429"), "{ninth}");

    // A malformed message and an oversized one close their own channel only.
    let mut bad = held.pop().unwrap();
    bad.send_raw("{not json").await.unwrap();
    assert!(
        matches!(bad.recv(WAIT).await.unwrap(), ServerMsg::Error { code, .. } if code == "bad_frame")
    );
    let mut big = held.pop().unwrap();
    big.hello("big").await.unwrap();
    big.send_raw(&format!(
        "{{\"Ping\":{{\"nonce\":1}},\"pad\":\"{}\"}}",
        "x".repeat(20_000)
    ))
    .await
    .unwrap();
    assert!(
        matches!(big.recv(WAIT).await.unwrap(), ServerMsg::Error { code, .. } if code == "too_large")
    );
    let mut ok = held.pop().unwrap();
    ok.hello("ok").await.unwrap();
    ok.send(&ClientMsg::Ping { nonce: 7 }).await.unwrap();
    assert!(matches!(
        ok.recv(WAIT).await.unwrap(),
        ServerMsg::Pong { nonce: 7 }
    ));

    // Closed channels give their places back.
    bad.close().await;
    big.close().await;
    ok.close().await;
    for c in held {
        c.close().await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node.node.node.live.channels() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} channels left",
            node.node.node.live.channels()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await.unwrap();
}

/// A valid offer a browser might send (a data channel), made by a throwaway peer.
async fn an_offer() -> String {
    use webrtc::peer_connection::{PeerConnection, PeerConnectionBuilder, RTCConfigurationBuilder};
    struct Quiet;
    #[async_trait::async_trait]
    impl webrtc::peer_connection::PeerConnectionEventHandler for Quiet {}
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_handler(std::sync::Arc::new(Quiet))
        .with_udp_addrs(vec!["127.0.0.1:0".to_string()])
        .build()
        .await
        .unwrap();
    let _dc = pc.create_data_channel("sesame", None).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer).await.unwrap();
    let sdp = pc.local_description().await.unwrap().sdp;
    pc.close().await.unwrap();
    sdp
}

/// UDP sockets this process holds (its socket descriptors that /proc/net/udp lists).
fn udp_sockets() -> usize {
    let mine: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        n += text
            .lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .nth(9)
                    .is_some_and(|inode| mine.contains(inode))
            })
            .count();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_offers_holds_a_bounded_number_of_ports() {
    let node = TestNode::start_with(|c| c.write_rate = None).await.unwrap();
    node.admin().create_site("demo").await.unwrap();
    let url = node.node.url();
    let sdp = an_offer().await;
    let udp_before = udp_sockets();
    // 200 offers at once from one address, none of which will ever connect.
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (http, url, sdp) = (http.clone(), url.clone(), sdp.clone());
        tasks.push(tokio::spawn(async move {
            http.post(format!("{url}/v1/rtc"))
                .json(&serde_json::json!({"type": "offer", "sdp": sdp, "site": "demo"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let mut answered = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => answered += 1,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(answered, 8, "one address holds at most 8 connections");
    assert_eq!(refused, 192);
    assert_eq!(node.node.node.live.channels(), 8);
    // Each held offer has its sockets (two here), not each of the 200.
    let grown = udp_sockets().saturating_sub(udp_before);
    assert!(grown <= 8 * 4, "{grown} more UDP sockets for 8 held offers");
    // Another visitor is still served.
    let mut other = sesame_tests::rtc::RtcClient::connect_from(
        &url,
        "demo",
        None,
        "127.0.0.2".parse().unwrap(),
    )
    .await
    .unwrap();
    other.hello("other").await.unwrap();
    other.close().await;
    node.stop().await.unwrap();
}
