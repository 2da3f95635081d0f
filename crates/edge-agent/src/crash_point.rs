//! Named crash points, for the kill -9 tests of guarantee S1 ("every record acknowledged to
//! its producer is delivered at least once, in order per series, whatever moment the agent
//! dies at").
//!
//! Killing the agent at a random moment mostly lands it in an idle wait. To hit each phase
//! of a record's life many times, a test starts the agent with
//! `BULWARK_AGENT_CRASH_POINT=<phase>:<n>`: the n-th time the agent reaches that phase, the
//! thread that reached it logs `crash point reached` (with `phase` and `hit`) and stops there
//! for good, and the test, on reading that line, kills the process with SIGKILL. The other
//! threads keep running until the kill, as they would at a real crash.
//!
//! | phase | where |
//! |---|---|
//! | `received` | records appended to the queue, not yet flushed, producers not answered |
//! | `flushed` | flushed, producers not yet told "accepted" |
//! | `published` | a PUBLISH handed to the network, its PUBACK not yet received |
//! | `acked` | a PUBACK received, its record not yet deleted |
//!
//! Without the variable (production), [`hit`] is one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const ENV: &str = "BULWARK_AGENT_CRASH_POINT";

/// A phase of a record's life in the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Received,
    Flushed,
    Published,
    Acked,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Received,
        Phase::Flushed,
        Phase::Published,
        Phase::Acked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Received => "received",
            Phase::Flushed => "flushed",
            Phase::Published => "published",
            Phase::Acked => "acked",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug)]
struct Armed {
    phase: Phase,
    at: u64,
    hits: AtomicU64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

fn parse_spec(spec: &str) -> Result<(Phase, u64), String> {
    let (p, n) = spec
        .split_once(':')
        .ok_or_else(|| format!("{ENV}={spec:?}: expected PHASE:N, e.g. published:3"))?;
    let phase = Phase::parse(p).ok_or_else(|| {
        format!("{ENV}={spec:?}: unknown phase {p:?}; one of received, flushed, published, acked")
    })?;
    let at = n
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{ENV}={spec:?}: N must be a whole number from 1"))?;
    Ok((phase, at))
}

fn armed() -> &'static Option<Armed> {
    ARMED.get_or_init(|| {
        let spec = std::env::var(ENV).ok()?;
        match parse_spec(&spec) {
            Ok((phase, at)) => {
                tracing::warn!(phase = phase.as_str(), at, "crash point armed (test hook)");
                Some(Armed {
                    phase,
                    at,
                    hits: AtomicU64::new(0),
                })
            }
            Err(e) => {
                tracing::error!("{e}; crash point ignored");
                None
            }
        }
    })
}

/// Reads the environment once (call at start so a bad value is reported early).
pub fn init() {
    let _ = armed();
}

/// Marks that the agent reached `phase`. If that is the armed crash point's n-th hit, the
/// calling thread stops here forever (waiting for the test's SIGKILL).
pub fn hit(phase: Phase) {
    let Some(a) = armed() else { return };
    if a.phase != phase {
        return;
    }
    let n = a.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if n == a.at {
        tracing::warn!(phase = phase.as_str(), hit = n, "crash point reached");
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("published:3").unwrap(), (Phase::Published, 3));
        assert_eq!(parse_spec("acked:1").unwrap(), (Phase::Acked, 1));
        assert!(parse_spec("acked:0").is_err());
        assert!(parse_spec("sent:1").unwrap_err().contains("unknown phase"));
        assert!(parse_spec("flushed").is_err());
    }
}
