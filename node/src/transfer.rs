//! `sesame export SITE > FILE.jsonl` and `sesame import SITE FILE.jsonl`: a site's tuples as
//! one JSON object per line, `{"collection", "key", "value"}`.
//!
//! Export follows the site's change feed from the start, page by page (each page one
//! consistent read): every live tuple once, in commit order; a tuple written during the
//! export may appear twice, the later line holding its newer value, so importing the file
//! in order gives the newest.
//!
//! Import reads the whole file first and refuses it, naming every bad line (up to
//! [`BAD_LINES_SHOWN`]), before writing anything. Then it writes in transactions of at most
//! [`IMPORT_OPS_PER_TX`] puts, each with a client id and a sequence number, and records how
//! far the file is wholly committed in `FILE.progress`: run again, it resumes there, and a
//! transaction whose answer was lost is applied at most once. When no key comes twice in the
//! file, [`IMPORT_LANES`] transactions are in flight at once (each lane its own client id,
//! so their order does not matter); otherwise one, so the last line of a key wins.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sesame_client::Http;
use sesame_proto::api::{ChangeOp, TxRequest};
use sesame_proto::{Op, Value};

/// Puts per import transaction (well inside the transaction limits for small tuples; a
/// transaction also ends before 4 MiB of values).
pub const IMPORT_OPS_PER_TX: usize = 5_000;
const IMPORT_BYTES_PER_TX: usize = 4 << 20;
/// Bad lines named when a file is refused.
pub const BAD_LINES_SHOWN: usize = 100;
/// Changes per export page.
const EXPORT_PAGE: usize = 10_000;

/// Writes every live tuple of `site` to `out`, one JSON line each; returns how many.
pub async fn export(http: &Http, site: &str, out: &mut impl std::io::Write) -> anyhow::Result<u64> {
    let mut since = 0;
    let mut n = 0u64;
    loop {
        let page = http.changes(site, since, EXPORT_PAGE).await?;
        for c in &page.changes {
            if c.op != ChangeOp::Put {
                continue;
            }
            let Some(value) = &c.value else { continue };
            let line = serde_json::json!({
                "collection": c.collection, "key": c.key, "value": value.to_json()
            });
            writeln!(out, "{line}")?;
            n += 1;
        }
        if page.changes.is_empty() || page.next_since <= since {
            return Ok(n);
        }
        since = page.next_since;
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    collection: String,
    key: String,
    value: Value,
}

/// One line, checked as the node would check it.
fn parse(line: &str) -> Result<Op, String> {
    let l: Line = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let op = Op::Put {
        collection: l.collection,
        key: l.key,
        value: l.value,
        if_version: None,
    };
    let mut check = sesame_proto::Transaction {
        site: "check".into(),
        ops: vec![op],
        origin: None,
    };
    check
        .validate()
        .map_err(|e| e.to_string().replace("op 0: ", ""))?;
    Ok(check.ops.pop().expect("the one op checked"))
}

/// Imports `file` into `site`; returns how many tuples were written (by this run).
pub async fn import(http: &Http, site: &str, file: &Path) -> anyhow::Result<u64> {
    let open = || {
        std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .with_context(|| format!("open {}", file.display()))
    };
    // First pass: every line must be good, or nothing is written. It also learns whether a
    // key comes back later in the file, which decides how many transactions may be in
    // flight at once.
    let mut bad = Vec::new();
    let mut total = 0u64;
    let mut keys = KeySeen::default();
    for (i, line) in open()?.lines().enumerate() {
        let line = line.with_context(|| format!("read line {}", i + 1))?;
        total += 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse(&line) {
            Ok(op) => keys.see(op.collection(), op.key()),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !bad.is_empty() {
        let shown = bad.len().min(BAD_LINES_SHOWN);
        anyhow::bail!(
            "{} bad line(s); nothing was imported:\n{}{}",
            bad.len(),
            bad[..shown].join("\n"),
            if bad.len() > shown { "\n…" } else { "" }
        );
    }
    let lanes = if keys.repeated { 1 } else { IMPORT_LANES };

    let progress_file = progress_path(file);
    let (client_id, done) = read_progress(&progress_file, file)?;
    let bar = Progress::new(total, done);
    let mut ops = Vec::new();
    let mut bytes = 0;
    let mut written = 0u64;
    // Transactions sent so far, counting those of earlier runs: the n-th goes to lane
    // n % lanes with sequence number n / lanes + 1, the same in every run, so a resumed
    // import resends a transaction under the same (client id, seq) and the node applies it
    // at most once.
    let mut sent = done_txs(&progress_file)?;
    // Waited for oldest first, so the progress file only ever records a prefix of the file
    // that is wholly committed.
    let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
    let settle = |taken: Option<InFlight>| {
        let progress_file = progress_file.clone();
        let client_id = client_id.clone();
        async move {
            let Some(InFlight { task, line, txs }) = taken else {
                return anyhow::Ok(0);
            };
            let n = task.await.context("the import task failed")??;
            write_progress(&progress_file, &client_id, line, txs)?;
            Ok(n)
        }
    };
    let mut lines = open()?.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line_no = i as u64 + 1;
        if line_no <= done {
            continue;
        }
        let line = line?;
        if !line.trim().is_empty() {
            bytes += line.len();
            ops.push(parse(&line).map_err(|e| anyhow::anyhow!("line {line_no}: {e}"))?);
        }
        let last = lines.peek().is_none();
        if !ops.is_empty()
            && (ops.len() >= IMPORT_OPS_PER_TX || bytes >= IMPORT_BYTES_PER_TX || last)
        {
            if in_flight.len() >= lanes {
                written += settle(in_flight.pop_front()).await?;
            }
            bar.at(line_no);
            let lane = sent % lanes as u64;
            let seq = sent / lanes as u64 + 1;
            sent += 1;
            let id = if lanes == 1 {
                client_id.clone()
            } else {
                format!("{client_id}-{lane}")
            };
            let (http, site, batch) = (http.clone(), site.to_string(), std::mem::take(&mut ops));
            in_flight.push_back(InFlight {
                task: tokio::spawn(async move { send(&http, &site, &id, seq, batch).await }),
                line: line_no,
                txs: sent,
            });
            bytes = 0;
        }
    }
    while let Some(next) = in_flight.pop_front() {
        written += settle(Some(next)).await?;
    }
    bar.at(total);
    bar.finish();
    let _ = std::fs::remove_file(&progress_file);
    Ok(written)
}

/// Transactions in flight at once when no key repeats in the file: the node decodes and logs
/// one while it applies the other. With a repeated key the import keeps one in flight, so
/// the key's last line is the value that stays.
pub const IMPORT_LANES: usize = 2;
/// Keys remembered by the first pass (a hash set of 8-byte hashes: at most about 72 MiB);
/// a larger file is imported one transaction at a time.
const KEYS_SEEN_MAX: usize = 4_000_000;

/// Whether any key comes twice: 64-bit hashes of the keys seen (a collision only makes the
/// import take the careful path).
#[derive(Default)]
struct KeySeen {
    hashes: std::collections::HashSet<u64>,
    repeated: bool,
}

impl KeySeen {
    fn see(&mut self, collection: &str, key: &str) {
        if self.repeated {
            return;
        }
        if self.hashes.len() >= KEYS_SEEN_MAX {
            self.repeated = true;
            self.hashes = Default::default();
            return;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(collection.as_bytes());
        hasher.update(&[0]);
        hasher.update(key.as_bytes());
        let hash = hasher.finalize();
        let first: [u8; 8] = hash.as_bytes()[..8].try_into().expect("8 of 32 bytes");
        self.repeated = !self.hashes.insert(u64::from_le_bytes(first));
    }
}

/// A transaction being written: its task, its last line, and the transactions sent up to and
/// including it.
struct InFlight {
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
    line: u64,
    txs: u64,
}

/// Commits one batch; a retried one that was applied before counts as written.
async fn send(
    http: &Http,
    site: &str,
    client_id: &str,
    seq: u64,
    ops: Vec<Op>,
) -> anyhow::Result<u64> {
    let n = ops.len() as u64;
    let req = TxRequest {
        ops,
        client_id: Some(client_id.to_string()),
        seq: Some(seq),
    };
    http.tx(site, &req)
        .await
        .with_context(|| format!("import transaction {seq}"))?;
    Ok(n)
}

fn progress_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".progress");
    PathBuf::from(name)
}

/// The import's client id and the last line committed, from an earlier run's progress file
/// (or a new id and line 0).
fn read_progress(path: &Path, file: &Path) -> anyhow::Result<(String, u64)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an import's progress", path.display()))?;
            let id = v["client_id"]
                .as_str()
                .context("progress without a client id")?;
            let line = v["line"].as_u64().context("progress without a line")?;
            eprintln!(
                "resuming the import of {} after line {line}",
                file.display()
            );
            Ok((id.to_string(), line))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("read the operating system's random source");
            Ok((format!("import-{:016x}", u64::from_le_bytes(b)), 0))
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Transactions an earlier run committed (`seq`: written by imports that kept one in flight,
/// whose last sequence number was that count).
fn done_txs(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["txs"].as_u64().or_else(|| v["seq"].as_u64()))
        .unwrap_or(0))
}

fn write_progress(path: &Path, client_id: &str, line: u64, txs: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("progress.tmp");
    std::fs::write(
        &tmp,
        serde_json::json!({"client_id": client_id, "line": line, "txs": txs}).to_string(),
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: std::cell::Cell<std::time::Instant>,
}

impl Progress {
    fn new(total: u64, done: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} lines, {per_sec}, {eta} left",
                )
                .expect("a valid progress template"),
            );
            bar.set_position(done);
            bar
        });
        Progress {
            bar,
            total,
            last_line: std::cell::Cell::new(std::time::Instant::now()),
        }
    }

    fn at(&self, line: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(line),
            None => {
                if self.last_line.get().elapsed() >= std::time::Duration::from_secs(1)
                    || line == self.total
                {
                    self.last_line.set(std::time::Instant::now());
                    let _ = writeln!(std::io::stderr(), "imported {line} of {} lines", self.total);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeySeen;

    #[test]
    fn a_key_seen_twice_is_a_repeat_and_collections_keep_keys_apart() {
        let mut seen = KeySeen::default();
        seen.see("items", "a");
        seen.see("other", "a");
        seen.see("items", "b");
        seen.see("item", "sa");
        assert!(!seen.repeated);
        seen.see("items", "a");
        assert!(seen.repeated);
    }
}
