//! CPU time of processes, from `/proc`: this process (the nodes run in it) and its live child
//! processes (the nodes' render workers), so a figure holds everything Sesame did.

use std::time::Duration;

use anyhow::Context as _;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on Linux's common
/// architectures; `getconf CLK_TCK`).
const TICKS_PER_SECOND: u64 = 100;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpu {
    pub user: Duration,
    pub sys: Duration,
}

impl Cpu {
    pub fn total(&self) -> Duration {
        self.user + self.sys
    }

    /// The time spent since `earlier` (a reading of the same processes).
    pub fn since(&self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user + o.user,
            sys: self.sys + o.sys,
        }
    }
}

/// This process's CPU time (every thread, and children it has reaped) plus that of its live
/// children (and the children they reaped). A child that exits between two readings drops out
/// of the second until reaped; the render workers live as long as their node.
pub fn self_and_children() -> anyhow::Result<Cpu> {
    let me = std::process::id();
    let mut cpu =
        stat(&std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?)
            .context("parse /proc/self/stat")?
            .1;
    for entry in std::fs::read_dir("/proc").context("list /proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: skip it.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((ppid, c)) = stat(&text) {
            if ppid == me && pid != me {
                cpu = cpu + c;
            }
        }
    }
    Ok(cpu)
}

/// The parent pid and the CPU time (own plus reaped children's) in a `/proc/<pid>/stat` line.
fn stat(text: &str) -> Option<(u32, Cpu)> {
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = |t: u64| Duration::from_millis(t * 1000 / TICKS_PER_SECOND);
    let ppid = u32::try_from(field(4)?).ok()?;
    Some((
        ppid,
        Cpu {
            user: ticks(field(14)? + field(16)?),
            sys: ticks(field(15)? + field(17)?),
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn stat_lines_parse() {
        let line = "1234 (a b) S 99 1 1 0 -1 4194560 100 0 0 0 250 30 5 1 20 0 1 0 1 1 1";
        let (ppid, cpu) = super::stat(line).unwrap();
        assert_eq!(ppid, 99);
        assert_eq!(cpu.user, Duration::from_millis(2_550));
        assert_eq!(cpu.sys, Duration::from_millis(310));
        assert!(super::self_and_children().is_ok());
    }
}
