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
        #[command(flatten)]
        remote: Remote,
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
        #[command(flatten)]
        remote: Remote,
    },
    /// Get one tuple.
    Get {
        site: String,
        collection: String,
        key: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a tuple.
    Del {
        site: String,
        collection: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        remote: Remote,
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
        #[command(flatten)]
        remote: Remote,
    },
    /// Show what changed in a site after an index.
    Changes {
        site: String,
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[arg(long, default_value = DEV_DATA_DIR)]
    pub data: PathBuf,
    #[arg(long, default_value = DEV_HTTP_ADDR)]
    pub http: SocketAddr,
    /// Use this admin token instead of the saved or a generated one.
    #[arg(long, env = "SESAME_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    Create { name: String },
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a site token: `sesame token create SITE owner|editor|reader`.
    Create { site: String, role: String },
}

/// Which node to talk to and as whom.
#[derive(Debug, Args)]
pub struct Remote {
    #[arg(long, env = "SESAME_NODE", default_value = "http://127.0.0.1:7700")]
    pub node: String,
    /// Bearer token; defaults to the admin token `sesame dev` saved in ./sesame-data.
    #[arg(long, env = "SESAME_TOKEN", hide_env_values = true)]
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
    match cli.command {
        Command::Dev(args) => dev(args).await,
        Command::Site { command, remote } => match command {
            SiteCommand::Create { name } => print_json(&remote.client().create_site(&name).await?),
            SiteCommand::List => print_json(&remote.client().list_sites().await?),
        },
        Command::Put {
            site,
            collection,
            key,
            json,
            if_version,
            remote,
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
            remote,
        } => print_json(&remote.client().get(&site, &collection, &key).await?),
        Command::Del {
            site,
            collection,
            key,
            if_version,
            remote,
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
            remote,
        } => print_json(
            &remote
                .client()
                .scan(&site, &collection, &prefix, after.as_deref(), limit)
                .await?,
        ),
        Command::Changes {
            site,
            since,
            limit,
            remote,
        } => print_json(&remote.client().changes(&site, since, limit).await?),
        Command::Token {
            command: TokenCommand::Create { site, role },
            remote,
        } => {
            let role = match role.as_str() {
                "owner" => Role::Owner,
                "editor" => Role::Editor,
                "reader" => Role::Reader,
                other => anyhow::bail!("unknown role {other:?}: use owner, editor or reader"),
            };
            print_json(&remote.client().create_token(&site, role).await?)
        }
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(&args.data, args.http);
    config.admin_token = args.admin_token;
    let running = crate::node::start(config).await?;
    let url = running.url();
    println!("Sesame dev node listening on {url}");
    println!("  data:        {}", args.data.display());
    println!("  admin token: {}", running.admin_token);
    println!("  try:         sesame site create demo && sesame put demo profiles alice '{{\"name\": \"Alice\"}}'");
    println!(
        "  or:          curl -H 'Authorization: Bearer {}' {url}/v1/sites",
        running.admin_token
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = running.cancelled() => {}
    }
    println!("shutting down");
    running.shutdown().await
}
