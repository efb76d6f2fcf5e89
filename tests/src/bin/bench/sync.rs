//! Client sync over QUIC: commit → subscriber latency with 1 and with many subscribers,
//! initial sync of a large collection into an empty replica, and pushing a large offline
//! queue on reconnect. Each is shown beside the same work done through the HTTP API in the
//! same run (the write's own acknowledgement, a paged scan, concurrent writes).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sesame_client::{Client, Event, Options};
use sesame_proto::api::{TxRequest, TxResponse};
use sesame_proto::sync::Target;
use sesame_proto::{Op, Value};

use crate::report::{count, dur, ms, percentile, Row};
use crate::Args;

fn target(collection: &str) -> Target {
    Target::Site {
        site: "bench".into(),
        collection: Some(collection.into()),
        prefix: String::new(),
    }
}

fn put(collection: &str, key: String, v: i64) -> Op {
    Op::Put {
        collection: collection.into(),
        key,
        value: Value::Int(v),
        if_version: None,
    }
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("sync-").tempdir_in(base)?;
    let node = crate::site::start_node(&dir.path().join("node"), None).await?;
    let admin = node.admin();
    admin.create_site("bench").await?;
    let url = node.node.url();
    let token = node.node.admin_token.clone();

    for subscribers in args.sync_subscribers() {
        latency(args, &admin, &url, &token, subscribers, Kind::Client, rows).await?;
        if subscribers > 1 {
            latency(args, &admin, &url, &token, subscribers, Kind::Raw, rows).await?;
        }
    }
    initial_sync(args, &admin, &url, &token, dir.path(), rows).await?;
    offline_queue(args, &admin, &url, &token, dir.path(), rows).await?;
    node.stop().await?;
    Ok(())
}

/// What follows the collection: full clients (each with its replica, all in this process,
/// sharing its cores with the node), or bare QUIC sessions that only read frames (what a node
/// sends, without the work of 1,000 replicas on the same two cores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Client,
    Raw,
}

/// Writes one tuple at a time over HTTP while `subscribers` clients follow the collection;
/// each write's latency is from just before the write to each subscriber having it.
async fn latency(
    args: &Args,
    admin: &sesame_client::Http,
    url: &str,
    token: &str,
    subscribers: usize,
    kind: Kind,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let collection = format!("lat{subscribers}{kind:?}");
    let started: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let seen: Arc<Mutex<Vec<Duration>>> = Default::default();
    let mut clients = Vec::with_capacity(subscribers);
    let mut readers = Vec::with_capacity(subscribers);
    let raw = match kind {
        Kind::Raw => Some(RawSubscribers::new(url).await?),
        Kind::Client => None,
    };
    for _ in 0..subscribers {
        let (started, seen) = (started.clone(), seen.clone());
        let record = move |key: &str| {
            let now = Instant::now();
            if let Some(t) = started.lock().unwrap().get(key) {
                seen.lock().unwrap().push(now - *t);
            }
        };
        match &raw {
            Some(raw) => readers.push(raw.subscribe(token, target(&collection), record).await?),
            None => {
                let client = Client::connect(Options::new([url], token)).await?;
                let mut changes = client.subscribe(target(&collection))?;
                readers.push(tokio::spawn(async move {
                    while let Some(c) = changes.next().await {
                        record(&c.key);
                    }
                }));
                clients.push(client);
            }
        }
    }
    // Every subscriber's snapshot (empty) is in before the first write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writes = args.sync_writes();
    let mut acks = Vec::with_capacity(writes);
    for i in 0..writes {
        let key = format!("k{i}");
        let t = Instant::now();
        started.lock().unwrap().insert(key.clone(), t);
        admin
            .put("bench", &collection, &key, serde_json::json!(i), None)
            .await?;
        acks.push(t.elapsed());
        // Let every subscriber have it before the next write (a lone writer).
        let want = (i + 1) * subscribers;
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let mut lat = std::mem::take(&mut *seen.lock().unwrap());
    let delivered = lat.len();
    lat.sort();
    acks.sort();
    for r in readers {
        r.abort();
    }
    drop(clients);
    anyhow::ensure!(
        delivered == writes * subscribers,
        "{delivered} of {} deliveries arrived",
        writes * subscribers
    );
    let p50 = percentile(&lat, 50.0);
    let ack50 = percentile(&acks, 50.0);
    let who = match kind {
        Kind::Client => "client replica(s) in this process",
        Kind::Raw => "bare QUIC sessions (frames read, nothing stored)",
    };
    rows.push(Row::new(
        format!("commit → subscriber, {subscribers} {who}, p50 / p99 ({writes} writes)"),
        format!("{} / {}", ms(p50), ms(percentile(&lat, 99.0))),
        format!(
            "the write's HTTP ack: {} / {}",
            ms(ack50),
            ms(percentile(&acks, 99.0))
        ),
        format!(
            "{:.2}× the ack (target p99 ≤ 5 ms)",
            p50.as_secs_f64() / ack50.as_secs_f64()
        ),
    ));
    Ok(())
}

/// Bare subscriber sessions over one QUIC endpoint: hello, subscribe, then read frames.
struct RawSubscribers {
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
    server_name: String,
}

impl RawSubscribers {
    async fn new(url: &str) -> anyhow::Result<RawSubscribers> {
        let info: serde_json::Value = reqwest::get(format!("{url}/v1/sync")).await?.json().await?;
        let addr = info["quic"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no QUIC address"))?
            .parse()?;
        let pin = info["cert_blake3"].as_str().unwrap_or_default();
        let tls = sesame_client::sync_tls_config(None, pin).map_err(anyhow::Error::msg)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        )));
        Ok(RawSubscribers {
            endpoint,
            addr,
            server_name: info["server_name"].as_str().unwrap_or_default().to_string(),
        })
    }

    async fn subscribe(
        &self,
        token: &str,
        target: Target,
        record: impl Fn(&str) + Send + 'static,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        use sesame_proto::sync::{
            decode, encode_prefixed, ClientMsg, FrameReader, ServerMsg, Subscription,
            SYNC_PROTOCOL_VERSION,
        };
        let conn = self.endpoint.connect(self.addr, &self.server_name)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut hello = encode_prefixed(&ClientMsg::Hello {
            version: SYNC_PROTOCOL_VERSION,
            token: token.into(),
            client_id: "bench".into(),
        });
        hello.extend(encode_prefixed(&ClientMsg::Subscribe(Subscription {
            id: 1,
            target,
            since: 0,
        })));
        send.write_all(&hello).await?;
        Ok(tokio::spawn(async move {
            let _keep = (conn, send);
            let mut reader = FrameReader::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                reader.push(&buf[..n]);
                while let Ok(Some(frame)) = reader.next_frame() {
                    if let Ok(ServerMsg::Changes { tuples, .. }) = decode::<ServerMsg>(&frame) {
                        for t in tuples {
                            record(&t.key);
                        }
                    }
                }
            }
        }))
    }
}

/// Loads `n` small tuples, then times an empty replica (a file) syncing them all, beside a
/// paged HTTP scan of the same tuples.
async fn initial_sync(
    args: &Args,
    admin: &sesame_client::Http,
    url: &str,
    token: &str,
    dir: &Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = args.sync_tuples();
    let per_tx = 1_000;
    let load = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w * per_tx;
            while i < n {
                let ops = (i..(i + per_tx).min(n))
                    .map(|k| put("bulk", format!("t{k:08}"), k as i64))
                    .collect();
                let req = TxRequest {
                    ops,
                    client_id: None,
                    seq: None,
                };
                let _: TxResponse = admin.tx("bench", &req).await?;
                i += 4 * per_tx;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    eprintln!("loaded {n} tuples in {:?}", load.elapsed());

    // The peer: every tuple through the HTTP API, 10,000 per page.
    let t = Instant::now();
    let mut after: Option<String> = None;
    let mut got = 0;
    loop {
        let page = admin
            .scan("bench", "bulk", "", after.as_deref(), 10_000)
            .await?;
        got += page.tuples.len();
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let http = t.elapsed();
    anyhow::ensure!(got == n, "the scan saw {got} of {n}");

    let mut options = Options::new([url], token);
    options.replica = Some(dir.join("initial.db"));
    let t = Instant::now();
    let client = Client::connect(options).await?;
    let mut events = client.events();
    let sub = client.subscribe_id(target("bulk"))?;
    loop {
        match events.recv().await {
            Ok(Event::Changed {
                sub: s,
                through: Some(_),
                ..
            }) if s == sub => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => anyhow::bail!("events: {e}"),
        }
    }
    let took = t.elapsed();
    let have = client.scan("bench", "bulk", "", n + 1)?.len();
    anyhow::ensure!(have == n, "the replica has {have} of {n}");
    let bytes = client.bytes_received();
    rows.push(Row::new(
        format!(
            "initial sync of {} small tuples into an empty replica file",
            count(n)
        ),
        format!(
            "{} ({:.0} tuples/s, {:.1} MB received)",
            dur(took),
            n as f64 / took.as_secs_f64(),
            bytes as f64 / 1e6
        ),
        format!("HTTP paged scan, nothing stored: {}", dur(http)),
        format!(
            "{:.2}× the scan's time",
            took.as_secs_f64() / http.as_secs_f64()
        ),
    ));
    Ok(())
}

/// Queues `n` writes offline in a replica file, then times pushing them all on reconnect,
/// beside the same number of writes made through HTTP by 64 concurrent writers.
async fn offline_queue(
    args: &Args,
    admin: &sesame_client::Http,
    url: &str,
    token: &str,
    dir: &Path,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let n = args.sync_queue();
    let replica = dir.join("queue.db");
    // Offline: a node address nobody listens on.
    let nowhere = format!(
        "http://127.0.0.1:{}",
        sesame_tests::cluster::free_tcp_port()?
    );
    let mut options = Options::new([nowhere], token);
    options.replica = Some(replica.clone());
    let offline = Client::open(options)?;
    let t = Instant::now();
    for i in 0..n {
        offline.transact("bench", vec![put("queued", format!("q{i:07}"), i as i64)])?;
    }
    eprintln!("queued {n} writes offline in {:?}", t.elapsed());
    drop(offline);

    let mut options = Options::new([url], token);
    options.replica = Some(replica);
    let t = Instant::now();
    let client = Client::open(options)?;
    while client.pending_count()? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t.elapsed();

    // The peer: as many writes through HTTP, 64 at a time.
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (admin, next) = (admin.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                admin
                    .put(
                        "bench",
                        "http",
                        &format!("h{i:07}"),
                        serde_json::json!(i),
                        None,
                    )
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let http = t.elapsed();
    rows.push(Row::new(
        format!("push {} queued offline writes on reconnect", count(n)),
        format!("{} ({:.0} tx/s)", dur(took), n as f64 / took.as_secs_f64()),
        format!(
            "HTTP, 64 writers: {} ({:.0} tx/s)",
            dur(http),
            n as f64 / http.as_secs_f64()
        ),
        format!(
            "{:.2}× HTTP's rate",
            http.as_secs_f64() / took.as_secs_f64()
        ),
    ));
    Ok(())
}
