//! What a simulation records as it runs, shared by every simulated host and the driver. The
//! simulation runs on one thread in a fixed order, so every draw from [`Records::rng`] and
//! every append happens in the same order for the same seed.

use muster_raft::{RaftNode, TypeConfig};
use muster_store::{MemLogStore, MemSnapshotStore};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A small seeded generator (SplitMix64): the workload's and the agents' choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high` (`low` when empty).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// What survives a crash of a simulated control node: its log, vote, snapshot and archive of
/// ended jobs.
#[derive(Clone, Default)]
pub struct ControlDisk {
    pub log: MemLogStore<TypeConfig>,
    pub snapshots: MemSnapshotStore<TypeConfig>,
    pub archive: muster_raft::EndedJobs,
}

/// A control node's current incarnation and its log store.
pub struct SimNode {
    pub node: RaftNode,
    pub raft_log: MemLogStore<TypeConfig>,
}

/// How a client call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CallResult {
    Ok,
    /// Definitely not applied.
    Failed,
    /// May or may not have been applied (an error that says so, or the client's node crashed
    /// while the call was out).
    Indeterminate,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CallKind {
    Submit { job: String, name: String },
    Terminate { job: String },
    Cancel { job: String },
}

/// One client call: invoked at, ended at (`None`: never answered).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Call {
    pub client: u64,
    pub kind: CallKind,
    pub invoked: Duration,
    pub ended: Option<(Duration, CallResult)>,
}

/// One run of an attempt on a simulated agent, from the agent's side: when its process
/// started and stopped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Run {
    pub agent: String,
    pub job: String,
    pub attempt: u32,
    pub started: Duration,
    /// `None` while it runs.
    pub stopped: Option<Duration>,
    /// The exit code it ended with on its own (`None`: it was stopped, or is running).
    pub exit_code: Option<i32>,
}

/// What a simulated agent keeps on its disk: the attempts it started (as the real agent's
/// attempt records), so that a restart never runs one again.
#[derive(Clone, Default)]
pub struct AgentDisk {
    pub started: BTreeMap<(String, u32), Option<i32>>,
}

#[derive(Default)]
pub struct Shared {
    pub calls: Vec<Call>,
    pub runs: Vec<Run>,
    pub agent_disks: BTreeMap<String, AgentDisk>,
    /// Each control node's current incarnation (replaced on restart).
    pub nodes: BTreeMap<u64, SimNode>,
    pub next_job: u64,
    /// The compute environment, queue and definition exist.
    pub set_up: bool,
    /// Clients stop calling once this is set (the faults are over).
    pub workload_over: bool,
    /// Lines describing what happened, in order: faults, elections seen, violations found.
    pub events: Vec<String>,
}

#[derive(Clone)]
pub struct Records {
    shared: Arc<Mutex<Shared>>,
    rng: Arc<Mutex<Rng>>,
    /// The bug planted in this run, if any.
    pub bug: super::Bug,
    pub mix: super::Mix,
}

impl Records {
    pub fn new(seed: u64, bug: super::Bug, mix: super::Mix) -> Self {
        Self {
            shared: Arc::default(),
            rng: Arc::new(Mutex::new(Rng::new(seed ^ 0x5EED))),
            bug,
            mix,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn rng(&self) -> MutexGuard<'_, Rng> {
        self.rng.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Simulated time since the simulation began (the same on every host).
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}
