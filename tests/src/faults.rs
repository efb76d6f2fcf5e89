//! Seeded fault injection for randomized cluster tests: a plan of network weather and
//! crashes drawn from one seed, and a [`Faults`] policy that applies the current weather to
//! every message between nodes.
//!
//! The plan ([`plan`]) is a pure function of the seed, so replaying a seed replays the same
//! schedule of partitions, loss, delay, duplication, crashes and restarts. What it cannot
//! replay is thread timing: which message a loss hits, and which node leads when the plan
//! says "the leader", depend on the scheduler. The per-message draws come from their own
//! seeded generator, so a replay is close, not identical.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use sesame_node::peer::{Fault, Faults, RequestKind};

/// A node id, as the cluster numbers them (1..=voters).
pub type NodeId = u64;

/// Longest one message is delayed.
pub const DELAY_MS_MAX: u64 = 200;
/// Shortest and longest time one period of weather lasts.
pub const PERIOD_MS_MIN: u64 = 300;
pub const PERIOD_MS_MAX: u64 = 1_500;

/// Which node a partition or a crash is about: named now, or whoever leads when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Leader,
    Node(NodeId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Leader => write!(f, "the leader"),
            Target::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// How the links of a period are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partition {
    None,
    /// Every link to and from the target, both ways.
    Isolate(Target),
    /// These nodes on one side, the rest on the other (a minority/majority split).
    Split(BTreeSet<NodeId>),
    /// Requests from `from` to `to` are cut; the other direction works.
    OneWay {
        from: Target,
        to: Target,
    },
}

/// Random trouble on every link that is not cut: each a probability per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    pub drop_request: f64,
    pub drop_response: f64,
    pub duplicate: f64,
    pub delay: f64,
    pub delay_ms_max: u64,
}

impl Noise {
    pub const CALM: Noise = Noise {
        drop_request: 0.0,
        drop_response: 0.0,
        duplicate: 0.0,
        delay: 0.0,
        delay_ms_max: 0,
    };
}

/// What happens to a node at the start of a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    None,
    /// Stop this node (its data stays).
    Stop(Target),
    /// Start the stopped node again on its data.
    Restart,
}

/// One period of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Period {
    pub length: Duration,
    pub partition: Partition,
    /// Whether a cut link refuses at once (a partition the sender sees) or drops silently
    /// (the sender times out).
    pub cut_refuses: bool,
    pub noise: Noise,
    pub crash: Crash,
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms: ", self.length.as_millis())?;
        let how = if self.cut_refuses {
            "refused"
        } else {
            "dropped"
        };
        match &self.partition {
            Partition::None => write!(f, "no partition")?,
            Partition::Isolate(t) => write!(f, "{t} isolated ({how})")?,
            Partition::Split(side) => write!(f, "split {side:?} | rest ({how})")?,
            Partition::OneWay { from, to } => write!(f, "{from} -> {to} cut ({how})")?,
        }
        let n = &self.noise;
        if *n != Noise::CALM {
            write!(
                f,
                "; loss {:.0}%+{:.0}%, dup {:.0}%, delay {:.0}% up to {} ms",
                n.drop_request * 100.0,
                n.drop_response * 100.0,
                n.duplicate * 100.0,
                n.delay * 100.0,
                n.delay_ms_max
            )?;
        }
        match self.crash {
            Crash::None => Ok(()),
            Crash::Stop(t) => write!(f, "; stop {t}"),
            Crash::Restart => write!(f, "; restart the stopped node"),
        }
    }
}

/// The schedule of a safety phase of at least `length`, for `voters` nodes, from `seed`.
/// At most one node is down at a time, so a majority can make progress some of the time;
/// the node stopped last is restarted within a few periods.
pub fn plan(seed: u64, voters: u64, length: Duration) -> Vec<Period> {
    assert!(voters >= 3, "a fault schedule needs at least three voters");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut periods = Vec::new();
    let mut total = Duration::ZERO;
    let mut down_for: Option<u32> = None;
    while total < length {
        let ms = rng.random_range(PERIOD_MS_MIN..=PERIOD_MS_MAX);
        let node = |rng: &mut ChaCha8Rng| Target::Node(rng.random_range(1..=voters));
        let target = |rng: &mut ChaCha8Rng| {
            if rng.random_bool(0.5) {
                Target::Leader
            } else {
                node(rng)
            }
        };
        let partition = match rng.random_range(0..10) {
            0..=2 => Partition::None,
            3..=4 => Partition::Isolate(Target::Leader),
            5 => Partition::Isolate(node(&mut rng)),
            6..=7 => {
                // A minority: one node of three, one or two of five.
                let size = rng.random_range(1..=(voters - 1) / 2);
                let mut side = BTreeSet::new();
                while side.len() < size as usize {
                    side.insert(rng.random_range(1..=voters));
                }
                Partition::Split(side)
            }
            _ => {
                let from = target(&mut rng);
                let to = loop {
                    let to = node(&mut rng);
                    if to != from {
                        break to;
                    }
                };
                Partition::OneWay { from, to }
            }
        };
        let cut_refuses = rng.random_bool(0.5);
        let noise = if rng.random_bool(0.4) {
            Noise::CALM
        } else {
            Noise {
                drop_request: rng.random_range(0.0..0.15),
                drop_response: rng.random_range(0.0..0.15),
                duplicate: rng.random_range(0.0..0.2),
                delay: rng.random_range(0.0..0.5),
                delay_ms_max: rng.random_range(2..=DELAY_MS_MAX),
            }
        };
        let crash = match down_for {
            Some(n) if n >= 3 || (n >= 1 && rng.random_bool(0.5)) => {
                down_for = None;
                Crash::Restart
            }
            Some(n) => {
                down_for = Some(n + 1);
                Crash::None
            }
            None if rng.random_bool(0.2) => {
                down_for = Some(0);
                Crash::Stop(target(&mut rng))
            }
            None => Crash::None,
        };
        let period = Period {
            length: Duration::from_millis(ms),
            partition,
            cut_refuses,
            noise,
            crash,
        };
        total += period.length;
        periods.push(period);
    }
    periods
}

/// The weather now: which directed links are cut and how, and the noise on the others.
#[derive(Debug, Clone)]
struct Weather {
    cut: BTreeSet<(NodeId, NodeId)>,
    cut_fault: Fault,
    noise: Noise,
}

/// A [`Faults`] policy whose weather the test changes over time; per-message draws come
/// from a generator seeded from the test's seed.
pub struct RandomFaults {
    state: Mutex<(Weather, ChaCha8Rng)>,
}

impl RandomFaults {
    pub fn new(seed: u64) -> RandomFaults {
        let calm = Weather {
            cut: BTreeSet::new(),
            cut_fault: Fault::Refuse,
            noise: Noise::CALM,
        };
        // A stream of its own, so the plan's draws do not depend on message traffic.
        let rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e5a_3e00_fa17_5eed);
        RandomFaults {
            state: Mutex::new((calm, rng)),
        }
    }

    /// Applies `period`'s partition and noise among `nodes`, with `leader` standing for
    /// [`Target::Leader`] (no leader known: the partition falls on no one).
    pub fn set(&self, period: &Period, nodes: &[NodeId], leader: Option<NodeId>) {
        let resolve = |t: Target| match t {
            Target::Leader => leader,
            Target::Node(id) => Some(id),
        };
        let mut cut = BTreeSet::new();
        let mut split = |side: &BTreeSet<NodeId>| {
            for &a in side {
                for &b in nodes.iter().filter(|b| !side.contains(b)) {
                    cut.insert((a, b));
                    cut.insert((b, a));
                }
            }
        };
        match &period.partition {
            Partition::None => {}
            Partition::Isolate(t) => {
                if let Some(id) = resolve(*t) {
                    split(&BTreeSet::from([id]));
                }
            }
            Partition::Split(side) => split(side),
            Partition::OneWay { from, to } => {
                if let (Some(a), Some(b)) = (resolve(*from), resolve(*to)) {
                    if a != b {
                        cut.insert((a, b));
                    }
                }
            }
        }
        let weather = Weather {
            cut,
            cut_fault: if period.cut_refuses {
                Fault::Refuse
            } else {
                Fault::DropRequest
            },
            noise: period.noise,
        };
        self.lock().0 = weather;
    }

    /// No faults from now on.
    pub fn heal(&self) {
        let mut state = self.lock();
        state.0.cut.clear();
        state.0.noise = Noise::CALM;
    }

    /// The directed links cut now.
    pub fn cut_links(&self) -> BTreeSet<(NodeId, NodeId)> {
        self.lock().0.cut.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Weather, ChaCha8Rng)> {
        self.state
            .lock()
            .expect("the fault lock is never held across a panic")
    }
}

impl Faults for RandomFaults {
    fn decide(&self, from: NodeId, to: NodeId, kind: RequestKind) -> Fault {
        let mut state = self.lock();
        let (weather, rng) = &mut *state;
        if weather.cut.contains(&(from, to)) {
            return weather.cut_fault;
        }
        let n = weather.noise;
        if n == Noise::CALM {
            return Fault::Deliver;
        }
        if rng.random_bool(n.drop_request) {
            return Fault::DropRequest;
        }
        if rng.random_bool(n.drop_response) {
            return Fault::DropResponse;
        }
        // The transport never retransmits a request (QUIC streams are reliable); duplicates
        // stand for a network that replays packets under Raft, whose messages are idempotent.
        // A forwarded write or membership change is not, and nothing in the node resends one.
        let idempotent = !matches!(kind, RequestKind::Propose | RequestKind::ChangeMembership);
        if idempotent && rng.random_bool(n.duplicate) {
            return Fault::Duplicate;
        }
        if rng.random_bool(n.delay) {
            return Fault::Delay(Duration::from_millis(rng.random_range(1..=n.delay_ms_max)));
        }
        Fault::Deliver
    }
}

/// A seed from the clock, for runs that are not asked to replay one.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Spread the clock's low-entropy bits over the whole word.
    ChaCha8Rng::seed_from_u64(nanos ^ u64::from(std::process::id())).random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_plan_and_another_differs() {
        let length = Duration::from_secs(30);
        let a = plan(7, 3, length);
        assert_eq!(a, plan(7, 3, length));
        assert_ne!(a, plan(8, 3, length));
        let total: Duration = a.iter().map(|p| p.length).sum();
        assert!(total >= length);
    }

    #[test]
    fn at_most_one_node_is_down_and_every_stop_is_restarted_soon() {
        for seed in 0..200 {
            let mut down = false;
            let mut periods_down = 0;
            for period in plan(seed, 3, Duration::from_secs(20)) {
                match period.crash {
                    Crash::Stop(_) => {
                        assert!(!down, "seed {seed}: a second node stopped");
                        down = true;
                        periods_down = 0;
                    }
                    Crash::Restart => {
                        assert!(down, "seed {seed}: a restart with nothing stopped");
                        down = false;
                    }
                    Crash::None if down => {
                        periods_down += 1;
                        assert!(periods_down <= 3, "seed {seed}: a node stays down");
                    }
                    Crash::None => {}
                }
            }
        }
    }

    #[test]
    fn the_weather_cuts_what_the_period_says() {
        let faults = RandomFaults::new(1);
        let period = Period {
            length: Duration::from_millis(500),
            partition: Partition::Isolate(Target::Leader),
            cut_refuses: true,
            noise: Noise::CALM,
            crash: Crash::None,
        };
        faults.set(&period, &[1, 2, 3], Some(2));
        assert_eq!(
            faults.cut_links(),
            BTreeSet::from([(1, 2), (2, 1), (2, 3), (3, 2)])
        );
        assert_eq!(faults.decide(2, 3, RequestKind::Vote), Fault::Refuse);
        assert_eq!(faults.decide(1, 3, RequestKind::Vote), Fault::Deliver);

        let one_way = Period {
            partition: Partition::OneWay {
                from: Target::Node(1),
                to: Target::Leader,
            },
            cut_refuses: false,
            ..period
        };
        faults.set(&one_way, &[1, 2, 3], Some(3));
        assert_eq!(faults.cut_links(), BTreeSet::from([(1, 3)]));
        assert_eq!(
            faults.decide(1, 3, RequestKind::AppendEntries),
            Fault::DropRequest
        );
        assert_eq!(
            faults.decide(3, 1, RequestKind::AppendEntries),
            Fault::Deliver
        );

        faults.heal();
        assert!(faults.cut_links().is_empty());
    }

    #[test]
    fn writes_are_never_duplicated() {
        let faults = RandomFaults::new(3);
        let period = Period {
            length: Duration::from_millis(500),
            partition: Partition::None,
            cut_refuses: true,
            noise: Noise {
                duplicate: 1.0,
                ..Noise::CALM
            },
            crash: Crash::None,
        };
        faults.set(&period, &[1, 2, 3], None);
        assert_eq!(faults.decide(1, 2, RequestKind::Propose), Fault::Deliver);
        assert_eq!(faults.decide(1, 2, RequestKind::Vote), Fault::Duplicate);
    }
}
