//! A linearizability checker for a register per key (Wing & Gong's search with Lowe's
//! memoisation, as Knossos and Porcupine do it).
//!
//! A history is the operations clients saw: each with the time it was called, the time it
//! returned (or `None` when its outcome is unknown: a timeout, a crash, `outcome_unknown`),
//! and what it did. The history is linearizable if every operation can be given one instant
//! between its call and its return such that, in that order, each read returns the value of
//! the latest write before it. An operation whose outcome is unknown may take effect at any
//! instant after its call, or never.
//!
//! Keys are independent registers, so a history is checked key by key (P-compositionality),
//! which keeps each search small. Before searching, writes whose outcome is unknown are
//! settled where the reads allow it (see [`settle_unknown_writes`]): left open, each one
//! multiplies the states the search may visit, and a few dozen of them on one key made it
//! run for minutes.

use std::collections::{BTreeMap, HashSet};

/// A value written to a register; `None` is "absent" (never written, or deleted).
pub type Value = Option<String>;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set the register (a put, or a delete with `None`).
    Write(Value),
    /// Read the register and saw this.
    Read(Value),
}

/// One operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub key: String,
    /// When the client sent it (any monotonic clock shared by the clients).
    pub call: u64,
    /// When the client got the answer; `None` when the outcome is unknown.
    pub ret: Option<u64>,
    pub action: Action,
}

/// Why a history is not linearizable: the key and its operations, for the report.
#[derive(Debug, Clone)]
pub struct Violation {
    pub key: String,
    pub ops: Vec<Op>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "key {:?}: no linearization of these {} operations:",
            self.key,
            self.ops.len()
        )?;
        for op in &self.ops {
            writeln!(f, "  [{} .. {:?}] {:?}", op.call, op.ret, op.action)?;
        }
        Ok(())
    }
}

/// Most operations on one key the search takes; a longer history is split by the caller.
pub const OPS_PER_KEY_MAX: usize = 4_096;

/// Checks a whole history, key by key, starting from every register absent.
pub fn check(history: &[Op]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        let ops = settle_unknown_writes(ops);
        if !check_register(&ops, None) {
            return Err(Violation {
                key: key.to_string(),
                ops,
            });
        }
    }
    Ok(())
}

/// Settles the writes of unknown outcome on one register without changing whether its
/// history is linearizable, when each value is written at most once:
/// - a value no read saw may never have been written: its write is dropped (leaving it out
///   only removes constraints that no read depends on);
/// - a value some read saw was written before that read returned: its write's return
///   becomes the earliest such read's.
///
/// Values written more than once, and deletes (`None`, which a read of an absent key also
/// returns), are left as they are.
pub fn settle_unknown_writes(ops: Vec<Op>) -> Vec<Op> {
    let mut writes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seen_by: BTreeMap<&str, u64> = BTreeMap::new();
    for op in &ops {
        match (&op.action, op.ret) {
            (Action::Write(Some(v)), _) => *writes.entry(v).or_default() += 1,
            (Action::Read(Some(v)), Some(ret)) => {
                let earliest = seen_by.entry(v).or_insert(ret);
                *earliest = (*earliest).min(ret);
            }
            _ => {}
        }
    }
    let settled: Vec<Option<Op>> = ops
        .iter()
        .map(|op| match (&op.action, op.ret) {
            (Action::Write(Some(v)), None) if writes[v.as_str()] == 1 => {
                seen_by.get(v.as_str()).map(|&ret| Op {
                    // A read may have been called before this write (and so fail the
                    // check), but it cannot have returned before.
                    ret: Some(ret.max(op.call)),
                    ..op.clone()
                })
            }
            _ => Some(op.clone()),
        })
        .collect();
    settled.into_iter().flatten().collect()
}

/// One event of the search's list: an operation's call or its return.
#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

/// Whether the operations on one register, starting at `initial`, are linearizable.
pub fn check_register(ops: &[Op], initial: Value) -> bool {
    assert!(
        ops.len() <= OPS_PER_KEY_MAX,
        "{} operations on one key; the checker takes at most {OPS_PER_KEY_MAX}",
        ops.len()
    );
    // Events in time order; at equal times, returns before calls (an operation that
    // returned at t happened before one called at t).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        if let Some(ret) = op.ret {
            assert!(
                ret >= op.call,
                "operation {op:?} returns before it is called"
            );
        }
        events.push((op.call, true, i));
        events.push((op.ret.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, is_call, i));
    let events: Vec<Event> = events
        .into_iter()
        .map(|(_, is_call, op)| Event { op, is_call })
        .collect();

    // A doubly linked list over the events, so lifting an operation out and putting it
    // back is O(1).
    let n = events.len();
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let head = n; // sentinel index
    next.push(0);
    prev.push(usize::MAX);
    if n > 0 {
        prev[0] = head;
    }
    let mut call_at = vec![0usize; ops.len()];
    let mut ret_at = vec![0usize; ops.len()];
    for (i, e) in events.iter().enumerate() {
        if e.is_call {
            call_at[e.op] = i;
        } else {
            ret_at[e.op] = i;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx < n {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx < n {
            prev[nx] = i;
        }
    };

    let mut linearized = vec![false; ops.len()];
    let mut state = initial;
    let mut seen: HashSet<(Vec<u64>, Value)> = HashSet::new();
    // The search stack: (op linearized, state before it).
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut cursor = next[head];
    // Operations with a known outcome not linearized yet; the others may never take effect.
    let mut known_left = ops.iter().filter(|op| op.ret.is_some()).count();
    loop {
        if known_left == 0 {
            return true;
        }
        let mut advanced = false;
        if cursor < n && events[cursor].is_call {
            let op = events[cursor].op;
            let (ok, after) = step(&state, &ops[op].action);
            if ok {
                linearized[op] = true;
                let key = (bits(&linearized), after.clone());
                if seen.insert(key) {
                    stack.push((op, state.clone()));
                    state = after;
                    unlink(&mut next, &mut prev, call_at[op]);
                    unlink(&mut next, &mut prev, ret_at[op]);
                    known_left -= usize::from(ops[op].ret.is_some());
                    cursor = next[head];
                    advanced = true;
                } else {
                    linearized[op] = false;
                }
            }
            if !advanced {
                cursor = next[cursor];
            }
        } else {
            // A return (of an operation not linearized yet) or the end: backtrack.
            let Some((op, before)) = stack.pop() else {
                return false;
            };
            relink(&mut next, &mut prev, ret_at[op]);
            relink(&mut next, &mut prev, call_at[op]);
            known_left += usize::from(ops[op].ret.is_some());
            linearized[op] = false;
            state = before;
            cursor = next[call_at[op]];
        }
    }
}

/// Applies `action` to a register holding `state`: whether it is allowed, and the state after.
fn step(state: &Value, action: &Action) -> (bool, Value) {
    match action {
        Action::Write(v) => (true, v.clone()),
        Action::Read(v) => (v == state, state.clone()),
    }
}

fn bits(flags: &[bool]) -> Vec<u64> {
    let mut out = vec![0u64; flags.len().div_ceil(64)];
    for (i, &f) in flags.iter().enumerate() {
        if f {
            out[i / 64] |= 1 << (i % 64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(call: u64, ret: Option<u64>, v: &str) -> Op {
        Op {
            key: "k".into(),
            call,
            ret,
            action: Action::Write(Some(v.into())),
        }
    }

    fn r(call: u64, ret: u64, v: Option<&str>) -> Op {
        Op {
            key: "k".into(),
            call,
            ret: Some(ret),
            action: Action::Read(v.map(str::to_string)),
        }
    }

    #[test]
    fn sequential_histories() {
        assert!(check(&[w(0, Some(1), "a"), r(2, 3, Some("a"))]).is_ok());
        assert!(check(&[r(0, 1, None), w(2, Some(3), "a")]).is_ok());
        assert!(
            check(&[w(0, Some(1), "a"), r(2, 3, None)]).is_err(),
            "stale read"
        );
        assert!(
            check(&[w(0, Some(1), "a"), w(2, Some(3), "b"), r(4, 5, Some("a"))]).is_err(),
            "a read older than an acknowledged write"
        );
    }

    #[test]
    fn concurrent_operations_may_order_either_way() {
        // The write overlaps both reads: one may see it, the other not, in that order only.
        let ok = [w(0, Some(10), "a"), r(1, 2, None), r(3, 4, Some("a"))];
        assert!(check(&ok).is_ok());
        let bad = [w(0, Some(10), "a"), r(1, 2, Some("a")), r(3, 4, None)];
        assert!(check(&bad).is_err(), "a read went back in time");
        // Two overlapping writes, reads settle on one.
        let two = [
            w(0, Some(5), "a"),
            w(1, Some(6), "b"),
            r(7, 8, Some("a")),
            r(9, 10, Some("a")),
        ];
        assert!(check(&two).is_ok());
        let flip = [
            w(0, Some(5), "a"),
            w(1, Some(6), "b"),
            r(7, 8, Some("a")),
            r(9, 10, Some("b")),
        ];
        assert!(check(&flip).is_err());
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_take_effect() {
        let applied = [w(0, None, "a"), r(5, 6, Some("a"))];
        assert!(check(&applied).is_ok());
        let not_applied = [w(0, None, "a"), r(5, 6, None)];
        assert!(check(&not_applied).is_ok());
        let late = [w(0, None, "a"), r(5, 6, Some("a")), r(7, 8, None)];
        assert!(check(&late).is_err(), "once seen, a write stays");
        let before_call = [r(0, 1, Some("a")), w(2, None, "a")];
        assert!(check(&before_call).is_err(), "seen before it was sent");
    }

    #[test]
    fn unknown_writes_are_settled_by_what_reads_saw() {
        // Never read: dropped. Read: it returns by the first read that saw it.
        let settled = settle_unknown_writes(vec![
            w(0, None, "a"),
            w(1, None, "b"),
            r(5, 6, Some("b")),
            r(7, 8, Some("b")),
        ]);
        assert_eq!(
            settled,
            vec![w(1, Some(6), "b"), r(5, 6, Some("b")), r(7, 8, Some("b"))]
        );
        // A value written twice stays open.
        let twice = vec![w(0, None, "a"), w(1, Some(2), "a"), r(3, 4, Some("a"))];
        assert_eq!(settle_unknown_writes(twice.clone()), twice);
        // Seen before it was sent: still caught.
        assert!(check(&[r(0, 1, Some("a")), w(2, None, "a")]).is_err());
    }

    #[test]
    fn many_unknown_writes_are_checked_quickly() {
        // Overlapping unknown writes, a few of them seen, and a stale read at the end.
        let mut h = Vec::new();
        for i in 0..2_000u64 {
            h.push(w(i, None, &format!("u{i}")));
            if i % 100 == 0 {
                h.push(r(i + 1, i + 2, Some(&format!("u{i}"))));
            }
        }
        assert!(check(&h).is_ok());
        h.push(r(3_000, 3_001, Some("u100")));
        assert!(check(&h).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![w(0, Some(1), "a")];
        h.push(Op {
            key: "other".into(),
            ..r(2, 3, None)
        });
        assert!(check(&h).is_ok());
    }

    #[test]
    fn a_long_history_is_checked_quickly() {
        // 1,000 overlapping writes and reads that see the latest value.
        let mut h = Vec::new();
        for i in 0..500u64 {
            h.push(w(i * 10, Some(i * 10 + 15), &i.to_string()));
            h.push(r(i * 10 + 16, i * 10 + 17, Some(&i.to_string())));
        }
        assert!(check(&h).is_ok());
        // The same with one stale read at the end is caught.
        h.push(r(10_000, 10_001, Some("3")));
        assert!(check(&h).is_err());
    }
}
