//! `muster-raft`: Muster's replicated log.
//!
//! - [`TypeConfig`]: openraft's types for Muster — entries carry `muster_core::Command`s and
//!   applying one yields an `Outcome`.
//! - [`StateMachine`]: the in-memory `muster_core::State` behind openraft's state machine
//!   trait, snapshotting through a `muster_store::SnapshotStore`.
//! - [`PeerNetwork`] and [`RaftGrpc`]: Raft RPCs over tonic, one cached channel per peer.
//! - [`RaftNode`]: what the rest of the control node uses: `propose` (forwarded to the leader
//!   when this node is a follower) and `read` (linearizable through a read index).
#![allow(clippy::result_large_err)]

pub mod archive;
pub mod backup;
pub mod election;
pub mod membership;
mod network;
mod node;
mod service;
mod snapshot_data;
mod state_machine;

pub use archive::EndedJobs;
pub use membership::Member;
pub use network::{Dialer, PeerAddrs, PeerDirectory, PeerNetwork};
pub use node::{ProposeError, RaftNode, ReadError, WriteError};
pub use service::RaftGrpc;
pub use snapshot_data::{SnapshotData, SnapshotReader, SnapshotSpool};
pub use state_machine::{AppliedState, StateHandle, StateMachine, stored_state};

use std::sync::Arc;

/// Control nodes are numbered; the number is fixed in each node's config.
pub type NodeId = u64;

/// A command as openraft carries it. openraft copies an entry's payload as it goes (the
/// proposal, the log cache, every follower's AppendEntries); shared, a copy costs a
/// reference count rather than a deep copy of up to thousands of placements or submits.
/// Encoded exactly as the [`Command`](muster_core::Command) it holds.
#[derive(Debug, Clone)]
pub struct LoggedCommand(pub Arc<muster_core::Command>);

impl From<muster_core::Command> for LoggedCommand {
    fn from(command: muster_core::Command) -> Self {
        Self(Arc::new(command))
    }
}

impl serde::Serialize for LoggedCommand {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for LoggedCommand {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        muster_core::Command::deserialize(deserializer).map(Self::from)
    }
}

openraft::declare_raft_types!(
    /// Muster's openraft type configuration.
    pub TypeConfig:
        D = LoggedCommand,
        R = muster_core::Outcome,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = SnapshotData,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Log entries between snapshots, unless configured (`snapshot_every_entries`). A snapshot serializes the whole state (about 1.2 s of CPU
/// per million jobs, with applies waiting meanwhile), so its cost grows with the number of
/// jobs held: taken every 5,000 entries (openraft's default) it ate most of a 2-core machine
/// once 20,000 jobs were stored (see BENCHMARKS.md).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 100_000;

/// Entries openraft sends in one AppendEntries. With entries of up to a few MiB (a batch of
/// submits, a round of 10,000 placements) this keeps a message well under
/// [`MAX_RAFT_MESSAGE_BYTES`], so a follower far behind still catches up.
pub const MAX_ENTRIES_PER_APPEND: u64 = 32;

/// How long the leader waits for a follower to take one chunk of a snapshot. The last chunk
/// is answered once the follower has installed the whole snapshot: decoded the state and
/// stored every archived record, minutes with millions of ended jobs. At openraft's 200 ms
/// a large snapshot's last chunk timed out (twice while a node with 2,000,000 archived jobs
/// was added), and the leader then sends the snapshot again from its first chunk. A follower
/// that stops answering is not waited for this long: HTTP/2 keepalive drops its connection
/// within seconds.
pub const INSTALL_SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

/// The largest gRPC message between control nodes, both ways. tonic's 4 MiB default was
/// smaller than a catch-up AppendEntries after a failover under load, which the follower then
/// refused forever.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The Raft timing Muster runs with (the constants live in [`election`]). A follower that
/// heard from a leader waits out the leader's lease (`election_timeout_max`) plus an election
/// timeout drawn from `min..max` before it stands, so a failed leader is replaced 1.0–1.2 s
/// after its last heartbeat. A vote gets `election_timeout_min` to be answered: 300 ms was
/// too short for control nodes busy with 10,000 agents, whose candidates then failed election
/// after election; 400–600 ms ran 1,000,000 jobs on 10,000 simulated agents without a leader
/// change (BENCHMARKS.md).
///
/// openraft's own elections are off: [`election::run_elections`] stands a node only after a
/// pre-vote, so that a node that cannot win never raises the term.
///
/// A snapshot is taken every `snapshot_every_entries` entries; the log before it is then
/// dropped but for the newest `snapshot_every_entries` entries (1,000 at most, openraft's
/// default), so that a follower a little behind is sent entries rather than the snapshot.
pub fn raft_config(cluster_name: &str, snapshot_every_entries: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        heartbeat_interval: election::HEARTBEAT.as_millis() as u64,
        election_timeout_min: election::ELECTION_TIMEOUT_MIN.as_millis() as u64,
        election_timeout_max: election::ELECTION_TIMEOUT_MAX.as_millis() as u64,
        enable_elect: false,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every_entries),
        max_in_snapshot_log_to_keep: snapshot_every_entries.min(1000),
        max_payload_entries: MAX_ENTRIES_PER_APPEND,
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT.as_millis() as u64,
        ..Default::default()
    }
}

#[cfg(test)]
mod storage_suite;
