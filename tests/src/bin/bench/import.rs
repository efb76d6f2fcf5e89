//! Bulk import: `sesame import`'s code path (JSON lines checked whole, then written in
//! order in transactions of `IMPORT_OPS_PER_TX` puts over the HTTP API, each durable in the
//! Raft log and applied to the store) against a plain SQLite bulk insert of the same rows,
//! in transactions of the same size, with the same durability (WAL, `synchronous=FULL`), on
//! the same disk: the storage engine's own ceiling for this load.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::report::{median, Row};
use crate::Args;

/// The generated lines: a profile-like value per key, about 120 bytes each.
fn write_lines(path: &Path, tuples: usize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..tuples {
        writeln!(
            out,
            r#"{{"collection":"people","key":"p{i:08}","value":{{"name":"Person {i}","bio":"Imported in bulk, line {i}.","n":{i}}}}}"#
        )?;
    }
    out.flush()?;
    Ok(())
}

/// The same rows into a fresh SQLite file: WAL, fsync per commit, one transaction per
/// `batch` rows.
fn sqlite_import(dir: &Path, lines: &Path, batch: usize) -> anyhow::Result<Duration> {
    use std::io::BufRead as _;
    let db = dir.join("peer.db");
    let _ = std::fs::remove_file(&db);
    let mut conn = rusqlite::Connection::open(&db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE tuples (collection TEXT NOT NULL, key TEXT NOT NULL, value BLOB,
         version INTEGER NOT NULL, PRIMARY KEY (collection, key)) WITHOUT ROWID",
    )?;
    let started = Instant::now();
    let reader = std::io::BufReader::new(std::fs::File::open(lines)?);
    let mut rows = reader.lines();
    let mut version = 0i64;
    loop {
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO tuples (collection, key, value, version) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for line in rows.by_ref().take(batch) {
                let v: serde_json::Value = serde_json::from_str(&line?)?;
                stmt.execute(rusqlite::params![
                    v["collection"].as_str().unwrap_or_default(),
                    v["key"].as_str().unwrap_or_default(),
                    serde_json::to_vec(&v["value"])?,
                    version
                ])?;
                n += 1;
            }
        }
        tx.commit()?;
        version += 1;
        if n < batch {
            break;
        }
    }
    let elapsed = started.elapsed();
    drop(conn);
    std::fs::remove_file(&db)?;
    Ok(elapsed)
}

pub async fn run(args: &Args, base: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(base)?;
    let tuples = args.import_tuples();
    let lines = dir.path().join("tuples.jsonl");
    write_lines(&lines, tuples)?;
    let node = crate::site::start_node(&dir.path().join("node"), None).await?;
    let admin = node.admin();
    let batch = sesame_node::transfer::IMPORT_OPS_PER_TX;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for run in 0..args.runs() {
        // A fresh site and a fresh copy of the file (an import resumes from its progress
        // file), in the same store: later runs import into a larger store.
        let site = format!("import{run}");
        admin.create_site(&site).await?;
        let file = dir.path().join(format!("{site}.jsonl"));
        std::fs::copy(&lines, &file)?;
        let started = Instant::now();
        let n = sesame_node::transfer::import(&admin, &site, &file).await?;
        ours.push(started.elapsed());
        anyhow::ensure!(n as usize == tuples, "imported {n} of {tuples} tuples");
        eprintln!("import run {run}: {:.1} s", ours[run].as_secs_f64());
        let d = dir.path().to_path_buf();
        let l = lines.clone();
        peer.push(tokio::task::spawn_blocking(move || sqlite_import(&d, &l, batch)).await??);
        eprintln!("sqlite run {run}: {:.1} s", peer[run].as_secs_f64());
    }
    node.stop().await?;
    let rate = |d: Duration| tuples as f64 / d.as_secs_f64();
    let best = |v: &[Duration]| *v.iter().min().expect("at least one run");
    rows.push(Row::new(
        format!(
            "import {tuples} tuples (sesame import path, {batch}-put txs), best / median of {}",
            ours.len()
        ),
        format!(
            "{:.0} / {:.0} tuples/s",
            rate(best(&ours)),
            rate(median(&ours))
        ),
        format!(
            "SQLite bulk insert, same rows and txs, WAL+FULL: {:.0} / {:.0} tuples/s",
            rate(best(&peer)),
            rate(median(&peer))
        ),
        format!(
            "{:.2}× (median)",
            median(&peer).as_secs_f64() / median(&ours).as_secs_f64()
        ),
    ));
    Ok(())
}
