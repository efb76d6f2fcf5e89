//! The `sesame` command line: `sesame dev` runs a node; the other commands talk to a node's
//! HTTP API through [`sesame_client::Http`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sesame_client::Http;
use sesame_proto::api::TxRequest;
use sesame_proto::{Op, Role, Value};

use crate::node::{NodeConfig, ADMIN_TOKEN_FILE};

/// Where `sesame dev` keeps its data unless told otherwise.
pub const DEV_DATA_DIR: &str = "./sesame-data";
/// The HTTP address `sesame dev` listens on unless told otherwise.
pub const DEV_HTTP_ADDR: &str = "127.0.0.1:7700";

#[derive(Debug, Parser)]
#[command(
    name = "sesame",
    version,
    about = "A replicated tuple database that projects its data into static web pages"
)]
pub struct Cli {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single node on the embedded default (data under ./sesame-data).
    Dev(DevArgs),
    /// Create and list sites.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Put a tuple: `sesame put SITE COLLECTION KEY JSON`.
    Put {
        site: String,
        collection: String,
        key: String,
        /// The value, as JSON (`'{"name": "Alice"}'`, `'"text"'`, `42`).
        json: String,
        /// Only if the tuple is at this version (0: only if it does not exist).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Get one tuple.
    Get {
        site: String,
        collection: String,
        key: String,
    },
    /// Delete a tuple.
    Del {
        site: String,
        collection: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// List tuples of a collection in key order.
    Scan {
        site: String,
        collection: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this key (the `next` cursor of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show what changed in a site after an index.
    Changes {
        site: String,
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Make tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A worker process of the node's render pool (started by the node; speaks a binary
    /// protocol on stdin and stdout). `main` runs it before any runtime starts.
    #[command(hide = true, name = RENDER_WORKER_COMMAND)]
    RenderWorker,
}

/// The hidden subcommand that makes `sesame` a render worker.
pub const RENDER_WORKER_COMMAND: &str = "render-worker";

#[derive(Debug, Args)]
pub struct DevArgs {
    #[arg(long, default_value = DEV_DATA_DIR)]
    pub data: PathBuf,
    #[arg(long, default_value = DEV_HTTP_ADDR)]
    pub http: SocketAddr,
    /// Use this admin token instead of the saved or a generated one.
    #[arg(long, env = "SESAME_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Publish to this object store (`s3://bucket/prefix`; S3/R2 settings from AWS_*
    /// variables) instead of <data>/objects.
    #[arg(long)]
    pub objects: Option<String>,
    /// Serve `Host: <site>.<domain>` too (subdomain mode).
    #[arg(long)]
    pub domain: Option<String>,
    /// The URL visitors reach this node at (for canonical links and sitemaps).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Projector throttle: commits within this many milliseconds of a render are coalesced.
    #[arg(long, default_value_t = crate::projection::DEBOUNCE_MS_DEFAULT)]
    pub debounce_ms: u64,
    /// Sustained transactions per second each site may write (0: unlimited).
    #[arg(long, default_value_t = crate::limits::WRITE_RATE_PER_SECOND_DEFAULT)]
    pub write_rate: f64,
    /// Transactions a site may write in a burst.
    #[arg(long, default_value_t = crate::limits::WRITE_BURST_DEFAULT)]
    pub write_burst: f64,
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    Create {
        name: String,
    },
    List,
    /// Load a folder (templates/, routes.toml, assets/, data/) into a site in one transaction.
    Deploy {
        site: String,
        dir: PathBuf,
    },
    /// Projection and publishing status.
    Status {
        site: String,
    },
    /// Published versions, newest first.
    Versions {
        site: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Serve an earlier version again (by the commit index it reflects).
    Rollback {
        site: String,
        index: u64,
    },
    /// Render the whole site again.
    Rebuild {
        site: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a site token: `sesame token create SITE owner|editor|reader`.
    Create { site: String, role: String },
}

/// Which node to talk to and as whom.
#[derive(Debug, Args)]
pub struct Remote {
    #[arg(
        long,
        global = true,
        env = "SESAME_NODE",
        default_value = "http://127.0.0.1:7700"
    )]
    pub node: String,
    /// Bearer token; defaults to the admin token `sesame dev` saved in ./sesame-data.
    #[arg(long, global = true, env = "SESAME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Remote {
    fn client(&self) -> Http {
        let token = self.token.clone().or_else(|| {
            std::fs::read_to_string(PathBuf::from(DEV_DATA_DIR).join(ADMIN_TOKEN_FILE))
                .ok()
                .map(|t| t.trim().to_string())
        });
        Http::new(&self.node, token)
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn parse_value(json: &str) -> anyhow::Result<Value> {
    let parsed: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("value is not valid JSON: {json}"))?;
    Value::from_json(parsed).map_err(|m| anyhow::anyhow!("invalid value: {m}"))
}

/// Runs a command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let remote = cli.remote;
    match cli.command {
        Command::Dev(args) => dev(args).await,
        Command::Site { command } => match command {
            SiteCommand::Create { name } => print_json(&remote.client().create_site(&name).await?),
            SiteCommand::List => print_json(&remote.client().list_sites().await?),
            SiteCommand::Deploy { site, dir } => deploy(&remote.client(), &site, &dir).await,
            SiteCommand::Status { site } => print_json(&remote.client().status(&site).await?),
            SiteCommand::Versions { site, limit } => {
                print_json(&remote.client().versions(&site, limit).await?)
            }
            SiteCommand::Rollback { site, index } => {
                print_json(&remote.client().rollback(&site, index).await?)
            }
            SiteCommand::Rebuild { site } => print_json(&remote.client().rebuild(&site).await?),
        },
        Command::Put {
            site,
            collection,
            key,
            json,
            if_version,
        } => {
            let value = parse_value(&json)?;
            let op = Op::Put {
                collection,
                key,
                value,
                if_version,
            };
            let req = TxRequest {
                ops: vec![op],
                client_id: None,
                seq: None,
            };
            print_json(&remote.client().tx(&site, &req).await?)
        }
        Command::Get {
            site,
            collection,
            key,
        } => print_json(&remote.client().get(&site, &collection, &key).await?),
        Command::Del {
            site,
            collection,
            key,
            if_version,
        } => print_json(
            &remote
                .client()
                .delete(&site, &collection, &key, if_version)
                .await?,
        ),
        Command::Scan {
            site,
            collection,
            prefix,
            limit,
            after,
        } => print_json(
            &remote
                .client()
                .scan(&site, &collection, &prefix, after.as_deref(), limit)
                .await?,
        ),
        Command::Changes { site, since, limit } => {
            print_json(&remote.client().changes(&site, since, limit).await?)
        }
        Command::Token {
            command: TokenCommand::Create { site, role },
        } => {
            let role = match role.as_str() {
                "owner" => Role::Owner,
                "editor" => Role::Editor,
                "reader" => Role::Reader,
                other => anyhow::bail!("unknown role {other:?}: use owner, editor or reader"),
            };
            print_json(&remote.client().create_token(&site, role).await?)
        }
        Command::RenderWorker => {
            anyhow::bail!("{RENDER_WORKER_COMMAND} runs from main, outside the async runtime")
        }
    }
}

async fn deploy(client: &Http, site: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let bundle = crate::bundle::load_dir(dir)?;
    let mut existing = Vec::new();
    for collection in crate::bundle::PAGE_COLLECTIONS {
        for key in client.keys(site, collection).await? {
            existing.push((collection.to_string(), key));
        }
    }
    let ops = crate::bundle::deploy_ops(&bundle, &existing);
    let deleted = ops
        .iter()
        .filter(|op| matches!(op, Op::Delete { .. }))
        .count();
    let req = TxRequest {
        ops,
        client_id: None,
        seq: None,
    };
    let written = client.tx(site, &req).await?;
    println!(
        "deployed {} tuples to {site} (deleted {deleted}) at index {}",
        bundle.len(),
        written.index
    );
    println!("status: sesame site status {site}");
    Ok(())
}

/// The site `sesame dev` seeds on first start.
pub const DEMO_SITE: &str = "demo";

/// Creates the demo site from the built-in bundle, unless the site exists. Returns whether
/// it seeded.
pub async fn seed_demo(node: &crate::node::Node) -> anyhow::Result<bool> {
    let exists = node
        .read(|v| v.site(DEMO_SITE))
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let create = sesame_proto::Command::CreateSite {
        name: DEMO_SITE.into(),
        created_at_ms: crate::node::now_ms(),
    };
    node.propose(create)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let ops = crate::bundle::deploy_ops(&crate::bundle::demo(), &[]);
    let tx = sesame_proto::Transaction {
        site: DEMO_SITE.into(),
        ops,
        origin: None,
    };
    tx.validate().context("validate the demo bundle")?;
    match node
        .write_tx(tx)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?
        .1
    {
        sesame_proto::CommandResult::Committed { .. } => Ok(true),
        other => anyhow::bail!("seed the demo site: {other:?}"),
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.data, args.http);
    config.admin_token = args.admin_token;
    config.objects = args.objects;
    config.domain = args.domain;
    config.public_url = args.public_url;
    config.debounce = std::time::Duration::from_millis(args.debounce_ms);
    config.write_rate = match (args.write_rate, args.write_burst) {
        (0.0, _) => None,
        (rate, burst) if rate > 0.0 && burst >= 1.0 => Some(crate::limits::RateLimit { per_second: rate, burst }),
        (rate, burst) => anyhow::bail!("--write-rate {rate} and --write-burst {burst}: need rate > 0 (or 0 for no limit) and burst >= 1"),
    };
    let running = crate::node::start(config).await?;
    let seeded = seed_demo(&running.node).await?;
    let url = running.url();
    let demo = format!("{url}/{DEMO_SITE}");
    println!("Sesame dev node listening on {url}");
    println!("  data:        {}", args.data.display());
    println!("  admin token: {}", running.admin_token);
    println!(
        "  demo site:   {demo}/{}",
        if seeded { "   (seeded just now)" } else { "" }
    );
    println!("               {demo}/alice  {demo}/bob  {demo}/carol");
    println!("  edit:        sesame put demo profiles alice '{{\"name\": \"Alice\", \"bio\": \"Edited\"}}'");
    println!("  status:      sesame site status demo");
    println!(
        "  API:         curl -H 'Authorization: Bearer {}' {url}/v1/sites",
        running.admin_token
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = running.cancelled() => {}
    }
    println!("shutting down");
    running.shutdown().await
}
