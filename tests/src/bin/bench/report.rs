//! The table the harness prints, and the small statistics and number formats its rows use.

use std::time::Duration;

/// One line of the table: what was measured, Sesame's figure, the peer's figure measured in
/// the same run, and how they compare.
pub struct Row {
    pub what: String,
    pub value: String,
    pub peer: String,
    pub ratio: String,
}

impl Row {
    pub fn new(
        what: impl Into<String>,
        value: impl Into<String>,
        peer: impl Into<String>,
        ratio: impl Into<String>,
    ) -> Row {
        Row {
            what: what.into(),
            value: value.into(),
            peer: peer.into(),
            ratio: ratio.into(),
        }
    }
}

/// Prints the rows as one markdown table on stdout (progress goes to stderr), after a line
/// naming the filesystem every section's data was on (`fs`).
pub fn print(fs: &str, rows: &[Row]) {
    println!(
        "Every section's data (Sesame's nodes, Hugo's source and output, nginx's root, etcd's \
         data) on {fs}.\n"
    );
    println!("| what | Sesame | peer (same run) | ratio |");
    println!("| --- | --- | --- | --- |");
    for r in rows {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        println!(
            "| {} | {} | {} | {} |",
            cell(&r.what),
            cell(&r.value),
            cell(&r.peer),
            cell(&r.ratio)
        );
    }
}

/// The `p`th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The median of unsorted samples.
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    percentile(&sorted, 50.0)
}

/// The smallest of the samples.
pub fn best(samples: &[Duration]) -> Duration {
    *samples.iter().min().expect("best of nothing")
}

/// Largest spread of repeated runs (max / min) before a row is flagged as untrustworthy.
pub const SPREAD_MAX: f64 = 1.5;

/// `⚠ spread 2.3× (Hugo)` when the slowest of `samples` took more than [`SPREAD_MAX`] times
/// the fastest: the machine was busy, or the runs were not alike.
pub fn spread_flag(who: &str, samples: &[Duration]) -> Option<String> {
    let min = samples.iter().min()?.as_secs_f64();
    let max = samples.iter().max()?.as_secs_f64();
    let spread = if min > 0.0 { max / min } else { f64::INFINITY };
    (spread > SPREAD_MAX).then(|| format!("⚠ spread {spread:.1}× ({who})"))
}

/// `best 1.2 s / median 1.4 s of 3` (or the one figure of a single run).
pub fn best_median(samples: &[Duration]) -> String {
    if samples.len() == 1 {
        return format!("{} (1 run)", dur(samples[0]));
    }
    format!(
        "best {} / median {} of {}",
        dur(best(samples)),
        dur(median(samples)),
        samples.len()
    )
}

/// Milliseconds with three decimals (the write rows, where fractions of a millisecond matter).
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// A duration at a precision that suits its size: `0.84 ms`, `23.1 ms`, `1.93 s`.
pub fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A count with thousands separators: `10,000`.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let head = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        r => r,
    };
    let mut out = digits[..head].to_string();
    for group in digits.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|&b| b as char));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        assert_eq!(count(7), "7");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(100_000), "100,000");
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), Duration::from_millis(51));
        assert_eq!(percentile(&d, 99.0), Duration::from_millis(99));
        assert_eq!(
            median(&[Duration::from_secs(3), Duration::from_secs(1)]),
            Duration::from_secs(3)
        );
        let s = |ms: &[u64]| {
            ms.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        assert_eq!(spread_flag("x", &s(&[100, 140])), None);
        assert_eq!(
            spread_flag("Hugo", &s(&[100, 300, 200])).as_deref(),
            Some("⚠ spread 3.0× (Hugo)")
        );
        assert_eq!(
            best_median(&s(&[300, 100, 200])),
            "best 100.0 ms / median 200.0 ms of 3"
        );
    }
}
