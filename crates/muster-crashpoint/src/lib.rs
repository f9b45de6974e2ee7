//! Crash points: named places in the write paths where a fault test can make a Muster process
//! die at once, chosen when it starts from `MUSTER_CRASH_AT` (FAULTS.md F9).
//!
//! `MUSTER_CRASH_AT=log_after_flush:3` makes the process abort the third time it passes
//! `log_after_flush`; several points are separated by commas, and the first one reached
//! ends the process. `abort` runs no destructor and flushes nothing, as a power cut or a
//! SIGKILL at that instruction would: what the process had written but not flushed is lost
//! with it, and what it acknowledged must not be.
//!
//! With the variable unset, a crash point costs one check of an initialised `OnceLock` and an
//! empty slice. Every point is listed in [`POINTS`], and [`check_env`] refuses a name
//! that is not, so that a misspelt point fails at start rather than never firing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms crash points.
pub const ENV: &str = "MUSTER_CRASH_AT";

/// Every crash point, with where it is.
pub const POINTS: &[(&str, &str)] = &[
    (
        "log_after_write",
        "a control node wrote Raft log entries into its store, not yet flushed to disk",
    ),
    (
        "log_after_flush",
        "a control node's Raft log entries are on disk, not yet reported to Raft",
    ),
    (
        "apply_before",
        "a control node is about to apply committed entries to its state",
    ),
    (
        "apply_after",
        "a control node applied committed entries, not yet reported to Raft",
    ),
    (
        "snapshot_install_before",
        "a control node received a snapshot from the leader, not yet installed it",
    ),
    (
        "snapshot_install_after",
        "a control node installed a received snapshot and stored it, not yet reported to Raft",
    ),
    (
        "agent_after_start",
        "an agent started an attempt, not yet reported it running",
    ),
];

struct Armed {
    point: &'static str,
    /// Passes left before the crash; the pass that takes it to zero aborts.
    remaining: AtomicU64,
}

static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();

/// Aborts the process if `point` is armed and this is the pass it waits for.
pub fn crash_point(point: &'static str) {
    debug_assert!(
        POINTS.iter().any(|(p, _)| *p == point),
        "unlisted crash point {point}"
    );
    for a in armed().iter().filter(|a| a.point == point) {
        let passed = a
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if passed == Ok(1) {
            eprintln!("{ENV}: crashing at {point}");
            std::process::abort();
        }
    }
}

fn armed() -> &'static [Armed] {
    ARMED.get_or_init(|| {
        // A variable that does not parse arms nothing: a process checks it at start with
        // `check_env` and refuses to run.
        from_env()
            .unwrap_or_default()
            .into_iter()
            .map(|(point, pass)| Armed {
                point,
                remaining: AtomicU64::new(pass),
            })
            .collect()
    })
}

/// The points `MUSTER_CRASH_AT` arms, each with the pass it crashes at, or what is wrong with
/// the variable. A process calls this once at start and exits on an error.
pub fn check_env() -> Result<Vec<(&'static str, u64)>, String> {
    let parsed = from_env()?;
    armed();
    Ok(parsed)
}

fn from_env() -> Result<Vec<(&'static str, u64)>, String> {
    match std::env::var(ENV) {
        Ok(value) => parse(&value),
        Err(_) => Ok(Vec::new()),
    }
}

/// `point:pass,point:pass` (`:pass` may be left out for the first pass).
fn parse(value: &str) -> Result<Vec<(&'static str, u64)>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, pass) = item.split_once(':').unwrap_or((item, "1"));
            let point = POINTS
                .iter()
                .map(|(p, _)| *p)
                .find(|p| *p == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = POINTS.iter().map(|(p, _)| *p).collect();
                    format!(
                        "{ENV}: no crash point {name:?}; known: {}",
                        known.join(", ")
                    )
                })?;
            let pass = pass
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    format!("{ENV}: {item:?}: the pass to crash at must be a whole number from 1")
                })?;
            Ok((point, pass))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_passes_are_read_and_bad_ones_named() {
        assert_eq!(
            parse("log_after_flush:3, apply_before").unwrap(),
            vec![("log_after_flush", 3), ("apply_before", 1)]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        let unknown = parse("log_after_fluhs:3").unwrap_err();
        assert!(unknown.contains("\"log_after_fluhs\"") && unknown.contains("log_after_flush"));
        assert!(
            parse("apply_after:0")
                .unwrap_err()
                .contains("apply_after:0")
        );
        assert!(parse("apply_after:x").is_err());
    }

    #[test]
    fn an_unarmed_point_passes() {
        // Nothing armed in this process (the tests never set the variable): every point passes.
        for (point, _) in POINTS {
            crash_point(point);
        }
    }
}
