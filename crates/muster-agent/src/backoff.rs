//! Retry pacing for agents that lost their control node.
//!
//! When a leader goes, every agent of the fleet finds out within the same few milliseconds.
//! Were they all to retry on a fixed short pause, ten thousand agents would send the
//! surviving nodes hundreds of thousands of calls a second while those nodes hold an
//! election, starving the very heartbeats that elect a leader. Each agent instead waits
//! longer after every failure in a row, and a jitter drawn per agent spreads the fleet out.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

/// Exponential backoff with "equal jitter": the n-th wait in a row is between half and all
/// of `min(first × 2ⁿ, max)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
    /// xorshift state: a cheap, deterministic sequence, different for every agent.
    jitter: u64,
}

impl Backoff {
    /// How an agent paces its calls to the control plane after a failure: 100 ms at first,
    /// never more than a second apart, so that after a failover an agent's next try comes at
    /// most a second after the new leader is up (the scheduler may already have placed work
    /// on it). The bench's simulated agents pace theirs the same way.
    pub fn for_control_plane(agent: &str) -> Self {
        Self::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
            agent,
        )
    }

    /// `seed` (an agent's node id) decides the agent's jitter sequence.
    pub fn new(first: Duration, max: Duration, seed: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        seed.hash(&mut hasher);
        Self {
            first,
            max,
            failures: 0,
            // xorshift never leaves zero.
            jitter: hasher.finish() | 1,
        }
    }

    /// How long to wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let fraction = (self.jitter % 1024) as f64 / 1024.0;
        ceiling.mul_f64(0.5 + fraction / 2.0)
    }

    /// Whether the last call failed (a wait is owed before the next).
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// A call succeeded: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn waits_grow_to_the_ceiling_and_stay_within_their_jitter() {
        let mut backoff = Backoff::new(FIRST, MAX, "node-a");
        for n in 0..12u32 {
            let ceiling = (FIRST * 2u32.pow(n)).min(MAX);
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "wait {n} was {delay:?}, outside {:?}..={ceiling:?}",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST);
    }

    #[test]
    fn agents_do_not_retry_in_lockstep() {
        let delays: std::collections::BTreeSet<Duration> = (0..100)
            .map(|i| {
                let mut backoff = Backoff::new(FIRST, MAX, &format!("node-{i}"));
                backoff.next_delay();
                backoff.next_delay()
            })
            .collect();
        assert!(
            delays.len() > 50,
            "100 agents drew only {} distinct waits",
            delays.len()
        );
    }
}
