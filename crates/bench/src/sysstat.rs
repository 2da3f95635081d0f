//! Process figures from /proc: CPU time (utime + stime) and resident memory, for the
//! generator itself and for the broker under test; and the open-file limit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::UsageError;

/// CPU time (user + system, all threads) used so far by this process, with nanosecond
/// resolution (CLOCK_PROCESS_CPUTIME_ID).
pub fn own_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// CPU time (user + system) used so far by process `pid`, from /proc/<pid>/stat (clock
/// tick resolution, usually 10 ms).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_nanos(
        u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(hz)).unwrap_or(u64::MAX),
    ))
}

/// utime + stime (fields 14 and 15, in clock ticks) of a /proc/<pid>/stat line. The
/// command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // `after` starts at field 3 (state): utime is field 14, i.e. the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of process `pid`, in kB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss_kb(&status).with_context(|| format!("{path}: no VmRSS line"))
}

/// The value of the `VmRSS:` line of /proc/<pid>/status, in kB.
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Fails with a usage error when `pid` is not a process we can observe.
pub fn check_broker_pid(pid: u32) -> Result<(), UsageError> {
    let path = format!("/proc/{pid}/stat");
    match std::fs::read_to_string(&path) {
        Ok(s) if parse_stat_cpu_ticks(&s).is_some() => Ok(()),
        Ok(_) => Err(UsageError(format!(
            "--broker-pid {pid}: cannot parse {path}"
        ))),
        Err(e) => Err(UsageError(format!(
            "--broker-pid {pid}: {path}: {e} (is the broker running with that pid?)"
        ))),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft limit
/// (`None`: unlimited).
pub fn raise_nofile_limit() -> Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .context("raising the soft RLIMIT_NOFILE to the hard limit")?;
    }
    Ok(getrlimit(Resource::Nofile).current)
}

/// CPU use of the generator and of the broker over an interval.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    broker_pid: Option<u32>,
    start: Instant,
    gen_start: Duration,
    broker_start: Option<Duration>,
}

/// Result of a [`CpuMeter`]: percent of one core.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    pub gen_pct: f64,
    pub broker_pct: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring now.
    pub fn start(broker_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            broker_pid,
            start: Instant::now(),
            gen_start: own_cpu_time(),
            broker_start: broker_pid.and_then(|p| cpu_time(p).ok()),
        }
    }

    /// CPU used since [`CpuMeter::start`], as percent of one core.
    pub fn stop(&self) -> CpuUse {
        let wall = self.start.elapsed().as_secs_f64();
        // Below one clock tick the broker figure is meaningless and ours is noise.
        let pct = |used: Duration| {
            if wall >= 0.01 {
                100.0 * used.as_secs_f64() / wall
            } else {
                0.0
            }
        };
        let gen = own_cpu_time();
        let broker = match (self.broker_pid, self.broker_start) {
            (Some(pid), Some(before)) => cpu_time(pid)
                .ok()
                .map(|after| pct(after.saturating_sub(before))),
            _ => None,
        };
        CpuUse {
            gen_pct: pct(gen.saturating_sub(self.gen_start)),
            broker_pct: broker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 37 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(287));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_figures() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_cpu_ticks(&stat).is_some());
        assert!(rss_kb(std::process::id()).unwrap() > 0);
        assert!(cpu_time(std::process::id()).is_ok());
        let a = own_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(own_cpu_time() > a, "{x}");
    }

    #[test]
    fn vm_rss_line() {
        let status = "Name:\tmosquitto\nVmPeak:\t  9000 kB\nVmRSS:\t    5312 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss_kb(status), Some(5312));
        assert_eq!(parse_vm_rss_kb("Name:\tx\n"), None);
    }

    #[test]
    fn missing_broker_pid_is_a_usage_error() {
        // Pid numbers this large are never allocated (pid_max is at most 2^22).
        let err = check_broker_pid(u32::MAX - 1).unwrap_err();
        assert!(err.0.contains("--broker-pid"), "{err}");
    }
}
