//! `muster-control`: one Muster control node.
//!
//! [`ControlNode::start`] wires the pieces together on listeners the caller already bound
//! (so tests use port 0): the sled store, openraft, the gRPC server (Raft peers and the
//! [`AgentGateway`]), the AWS Batch API, and the leader loops — today the scheduler with its
//! plan applier ([`scheduler`]).
//!
//! Every background loop has the same shape: it runs until the node's shutdown signal fires.

mod batcher;
pub mod bootstrap;
mod config;
mod gateway;
mod housekeeping;
mod liveness;
mod local_cluster;
mod node;
mod plane;
mod renewal;
pub mod replay;
pub mod restore;
pub mod scheduler;

pub use config::{
    DEFAULT_NODE_LOST_AFTER, FoundingJoinToken, PeerConfig, RawServerConfig, ServerConfig,
};
pub use gateway::AgentGateway;
pub use housekeeping::{DEFAULT_ENDED_JOBS_IN_MEMORY, JobHistory};
pub use liveness::Heartbeats;
pub use local_cluster::{ClusterError, LocalCluster, Tuning};
pub use muster_raft::RaftNode;
pub use node::{ControlNode, Listeners, StartError, spawn_loops};
pub use plane::RaftPlane;

/// Milliseconds since the Unix epoch, read once per command at its edge: the state machine
/// only ever sees the value.
pub fn now_millis() -> muster_core::Timestamp {
    let since = match SIMULATED_WALL_CLOCK.get() {
        Some(clock) => clock(),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    };
    muster_core::Timestamp(since.as_millis() as u64)
}

thread_local! {
    static SIMULATED_WALL_CLOCK: std::cell::Cell<Option<fn() -> std::time::Duration>> =
        const { std::cell::Cell::new(None) };
}

/// Makes [`now_millis`] on this thread read `clock` (time since the Unix epoch) instead of
/// the system's clock. For the deterministic simulation, which runs every simulated control
/// node on the one thread that drives it, each with a simulated wall clock.
pub fn simulate_wall_clock(clock: fn() -> std::time::Duration) {
    SIMULATED_WALL_CLOCK.set(Some(clock));
}
