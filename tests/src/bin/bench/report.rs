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

/// Prints the rows as one markdown table on stdout (progress goes to stderr).
pub fn print(rows: &[Row]) {
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
    }
}
