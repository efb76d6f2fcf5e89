//! Chat between two clients through mailboxes: each line typed is sent to the other client's
//! mailbox; what arrives in this client's mailbox is printed, with a note when the other side
//! has received a message (its receipt). Works when the other side is offline: it gets the
//! messages when it connects, even days later.
//!
//! ```sh
//! sesame site create chat
//! cargo run -p sesame-client --example chat -- http://127.0.0.1:7700 "$TOKEN" chat alice bob
//! cargo run -p sesame-client --example chat -- http://127.0.0.1:7700 "$TOKEN" chat bob alice
//! ```

use futures::StreamExt as _;
use sesame_client::{Client, Options};
use sesame_proto::sync::Target;
use sesame_proto::{Op, Value};
use tokio::io::AsyncBufReadExt as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [node, token, site, me, peer] = args.as_slice() else {
        eprintln!("usage: chat NODE_URL TOKEN SITE ME PEER");
        std::process::exit(2);
    };
    let mut options = Options::new([node.as_str()], token);
    options.client_id = Some(me.clone());
    // The replica keeps the conversation and unsent lines across runs.
    options.replica = Some(format!("chat-{me}.db").into());
    let client = Client::connect(options).await?;
    let mut inbox = client.subscribe(Target::Mailbox { site: site.clone() })?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut sent = 0u64;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(text) = line? else { return Ok(()) };
                sent += 1;
                let key = format!("{me}-{}-{sent}", std::process::id());
                client.transact(site, vec![Op::Send {
                    to: peer.clone(),
                    collection: "messages".into(),
                    key,
                    value: Value::from_json(serde_json::json!({ "text": text }))?,
                }])?;
            }
            change = inbox.next() => {
                let Some(c) = change else { return Ok(()) };
                let Some(value) = c.value else { continue };
                let json = value.to_json();
                if c.collection == "_receipts" {
                    println!("  ✓ {} received {}", json["to"].as_str().unwrap_or("?"), c.key);
                } else {
                    let from = c.origin.map(|o| o.client_id).unwrap_or_default();
                    println!("{from}: {}", json["text"].as_str().unwrap_or_default());
                }
            }
        }
    }
}
