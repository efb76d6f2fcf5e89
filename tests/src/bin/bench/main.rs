//! The benchmark harness: runs workloads against real nodes in this process, runs the peers
//! they are compared with on the same machine (the disk's own fsync, Hugo, nginx), and prints
//! one markdown table. Absolute numbers are noisy; each figure is shown next to a peer
//! measured in the same run, as a ratio.
//!
//! Sections (`--only`, comma-separated; all by default):
//! - `writes`: durable write latency and throughput on one voter ([`writes`]);
//! - `cluster`: the same on three voters, side by side with etcd, batched tuples, and
//!   failover time ([`cluster`]);
//! - `projection`: full projection of a generated site, side by side with Hugo
//!   ([`projection`]);
//! - `latency`: commit → new page served, by site size ([`latency`]);
//! - `serving`: one page under wrk, side by side with nginx ([`serving`]);
//! - `live`: browsers over WebRTC: commit → DOM updated in Chromium, data-channel set-up,
//!   node memory per channel ([`live`]);
//! - `sync`: app clients over QUIC: commit → subscriber latency, initial sync of a large
//!   collection, pushing an offline queue ([`sync`]);
//! - `import`: `sesame import` of generated JSON lines, side by side with a plain SQLite
//!   bulk insert of the same rows ([`import`]).
//!
//! Missing peers (`hugo`, `wrk`, `nginx`, `etcd`) are installed with `apt-get`. Every request goes
//! to 127.0.0.1, every loop is bounded, and every process started here is stopped here.
//!
//! `cargo run --release -p sesame-tests --bin sesame-bench -- --help`

mod cluster;
mod cpu;
mod etcd;
mod fs;
mod import;
mod latency;
mod live;
mod projection;
mod report;
mod serving;
mod site;
mod sync;
mod tools;
mod writes;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use report::Row;

/// The same allocator as the `sesame` binary, since the nodes measured here run in this
/// process. (SQLite, the import's peer, allocates through libc either way.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Writes,
    Cluster,
    Projection,
    Latency,
    Serving,
    Sync,
    Live,
    Import,
}

#[derive(Debug, Parser)]
#[command(about = "Sesame benchmark harness: prints a markdown table")]
pub struct Args {
    /// Sections to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "writes,cluster,projection,latency,serving,sync,live,import"
    )]
    only: Vec<Section>,
    /// Small sizes everywhere, for a run of a minute or two; explicit size flags still win.
    #[arg(long)]
    quick: bool,
    /// Where to put the nodes' data (default: a temporary folder under the current one,
    /// so it is on the same disk as the fsync probe).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Put every section's data (Sesame's nodes and the peers' files) on a tmpfs mounted
    /// under `--dir` for the run (or in /dev/shm when mounting is not allowed), so that
    /// neither side pays for the disk's journal. The table says which filesystem was used.
    #[arg(long)]
    tmpfs: bool,

    /// writes: sequential durable writes by one client [default: 2000; 200 with --quick].
    #[arg(long)]
    single_writes: Option<usize>,
    /// writes: concurrent writers for the throughput run.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// writes: length of the throughput run, in seconds [default: 5; 2 with --quick].
    #[arg(long)]
    seconds: Option<u64>,
    /// writes: fsyncs for the disk floor [default: 2000; 200 with --quick].
    #[arg(long)]
    fsyncs: Option<usize>,

    /// projection: profiles (pages) in the generated site [default: 10000; 1000 with --quick].
    #[arg(long)]
    profiles: Option<usize>,
    /// projection: rebuilds of Sesame and builds of Hugo; serving: rounds of wrk runs against
    /// node, edge and nginx in turn. Medians are compared, best and median reported
    /// [default: 3; 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,

    /// latency: site sizes in profiles, comma-separated, up to 1000000 (a 1M site takes
    /// minutes to load and project, and gigabytes of memory)
    /// [default: 1000,10000,100000; 1000,10000 with --quick].
    #[arg(long, value_delimiter = ',')]
    latency_sizes: Option<Vec<usize>>,
    /// latency: measured single-profile edits per site size [default: 200; 50 with --quick].
    #[arg(long)]
    edits: Option<usize>,
    /// latency: idle time between edits, in milliseconds, so that each edit finds the
    /// projector idle (as a lone editor does) instead of joining a round already under way.
    #[arg(long, default_value_t = 50)]
    edit_gap_ms: u64,
    /// The projector's debounce, in milliseconds, for the projection and latency nodes
    /// [default: the node's default].
    #[arg(long)]
    debounce_ms: Option<u64>,

    /// serving: length of each wrk run, in seconds [default: 10; 3 with --quick].
    #[arg(long)]
    wrk_seconds: Option<u64>,
    /// serving: distinct pages in the random-pages run [default: 10000; 1000 with --quick].
    #[arg(long)]
    serving_pages: Option<usize>,
    /// serving: wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// serving: wrk connections (kept alive).
    #[arg(long, default_value_t = 64)]
    wrk_connections: usize,

    /// sync: subscriber counts for the latency runs, comma-separated [default: 1,1000;
    /// 1,100 with --quick].
    #[arg(long, value_delimiter = ',')]
    sync_subscribers: Option<Vec<usize>>,
    /// sync: writes per latency run [default: 200; 50 with --quick].
    #[arg(long)]
    sync_writes: Option<usize>,
    /// sync: tuples for the initial sync [default: 1000000; 100000 with --quick].
    #[arg(long)]
    sync_tuples: Option<usize>,
    /// sync: offline writes queued, then pushed [default: 100000; 10000 with --quick].
    #[arg(long)]
    sync_queue: Option<usize>,

    /// import: tuples in the imported file [default: 1000000; 100000 with --quick].
    #[arg(long)]
    import_tuples: Option<usize>,

    /// live: edits whose commit → DOM time is measured [default: 100; 20 with --quick].
    #[arg(long)]
    live_edits: Option<usize>,
    /// live: data channels set up one after another [default: 50; 10 with --quick].
    #[arg(long)]
    live_setups: Option<usize>,
    /// live: data channels held open for the memory figure [default: 200; 40 with --quick].
    #[arg(long)]
    live_channels: Option<usize>,
}

impl Args {
    fn pick<T>(&self, set: Option<T>, full: T, quick: T) -> T {
        set.unwrap_or(if self.quick { quick } else { full })
    }
    pub fn single_writes(&self) -> usize {
        self.pick(self.single_writes, 2_000, 200)
    }
    pub fn seconds(&self) -> u64 {
        self.pick(self.seconds, 5, 2)
    }
    pub fn fsyncs(&self) -> usize {
        self.pick(self.fsyncs, 2_000, 200)
    }
    pub fn profiles(&self) -> usize {
        self.pick(self.profiles, 10_000, 1_000)
    }
    pub fn runs(&self) -> usize {
        self.pick(self.runs, 3, 1).max(1)
    }
    pub fn latency_sizes(&self) -> Vec<usize> {
        self.pick(
            self.latency_sizes.clone(),
            vec![1_000, 10_000, 100_000],
            vec![1_000, 10_000],
        )
    }
    pub fn edits(&self) -> usize {
        self.pick(self.edits, 200, 50).max(1)
    }
    pub fn debounce(&self) -> Option<Duration> {
        self.debounce_ms.map(Duration::from_millis)
    }
    pub fn sync_subscribers(&self) -> Vec<usize> {
        self.pick(self.sync_subscribers.clone(), vec![1, 1_000], vec![1, 100])
    }
    pub fn sync_writes(&self) -> usize {
        self.pick(self.sync_writes, 200, 50).max(1)
    }
    pub fn sync_tuples(&self) -> usize {
        self.pick(self.sync_tuples, 1_000_000, 100_000).max(1)
    }
    pub fn sync_queue(&self) -> usize {
        self.pick(self.sync_queue, 100_000, 10_000).max(1)
    }
    pub fn live_edits(&self) -> usize {
        self.pick(self.live_edits, 100, 20).max(1)
    }
    pub fn live_setups(&self) -> usize {
        self.pick(self.live_setups, 50, 10).max(1)
    }
    pub fn live_channels(&self) -> usize {
        self.pick(self.live_channels, 200, 40).max(1)
    }
    pub fn import_tuples(&self) -> usize {
        self.pick(self.import_tuples, 1_000_000, 100_000)
    }
    pub fn serving_pages(&self) -> usize {
        self.pick(self.serving_pages, 10_000, 1_000)
    }
    pub fn wrk_seconds(&self) -> u64 {
        self.pick(self.wrk_seconds, 10, 3).max(1)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The nodes' logs on stderr when asked for, e.g.
    // `RUST_LOG=sesame_node::pages::projection=debug` for where each publish's time goes.
    // Otherwise the in-process nodes log as `sesame` does by default (`info`), into a sink:
    // what a node does to log is part of what it costs, so the bench measures it too.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                sesame_node::cli::DEFAULT_LOG_FILTER,
            ))
            .with_writer(std::io::sink)
            .init();
    }
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    let tmp = fs::BenchDir::new(&base, args.tmpfs).context("make bench dir")?;
    eprintln!(
        "== data of every section in {} ({})",
        tmp.path().display(),
        tmp.describe
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut failed = 0;
    for section in [
        Section::Writes,
        Section::Cluster,
        Section::Projection,
        Section::Latency,
        Section::Serving,
        Section::Sync,
        Section::Live,
        Section::Import,
    ] {
        if !args.only.contains(&section) {
            continue;
        }
        let name = format!("{section:?}").to_lowercase();
        eprintln!("== {name}");
        let result = match section {
            Section::Writes => writes::run(&args, tmp.path(), &mut rows).await,
            Section::Cluster => cluster::run(&args, tmp.path(), &mut rows).await,
            Section::Projection => projection::run(&args, tmp.path(), &mut rows).await,
            Section::Latency => latency::run(&args, tmp.path(), &mut rows).await,
            Section::Serving => serving::run(&args, tmp.path(), &mut rows).await,
            Section::Sync => sync::run(&args, tmp.path(), &mut rows).await,
            Section::Live => live::run(&args, tmp.path(), &mut rows).await,
            Section::Import => import::run(&args, tmp.path(), &mut rows).await,
        };
        if let Err(e) = result {
            // One broken section should not hide the others' numbers.
            eprintln!("{name} failed: {e:#}");
            rows.push(Row::new(
                format!("{name} section"),
                format!("failed: {e:#}"),
                "—",
                "—",
            ));
            failed += 1;
        }
    }
    report::print(&tmp.describe, &rows);
    anyhow::ensure!(failed == 0, "{failed} section(s) failed; see the table");
    Ok(())
}
