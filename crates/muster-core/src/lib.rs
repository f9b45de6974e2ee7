//! `muster-core`: Muster's domain model and replicated state machine.
//!
//! Everything every control node must agree on lives here: compute environments, job queues,
//! job definitions, jobs and worker nodes ([`State`]), the [`Command`]s that change them, and
//! [`State::apply`], which is deterministic and total. Time and ids are fields of a command,
//! stamped by the node that received the request; a command that is invalid by the time it
//! applies is answered with a [`Rejection`], never a panic.
//!
//! The same checks run twice: the API calls [`State::check`] on its local replica before
//! proposing (so bad input never reaches the log), and `apply` runs them again against the
//! state the command actually meets.
//!
//! Must not depend on: tokio, tonic, prost, sled, openraft, clocks, randomness or any IO
//! (a test in `tests/` reads `cargo metadata` to keep it so).

mod command;
mod ids;
mod model;
mod resources;
mod state;
pub mod validate;

#[cfg(test)]
mod state_tests;

#[cfg(test)]
mod lifecycle_tests;

#[cfg(test)]
mod gang_tests;

pub use command::{
    AccessCommand, AdminCommand, AttemptEvent, AttemptReport, Command, IamCommand, JobSubmission,
    Outcome, Placement, Rejection,
};
pub use ids::{Arn, ArnScope, JobId, NodeId, Timestamp};
pub use model::*;
pub use resources::Resources;
pub use state::{
    ATTEMPT_TIMED_OUT, AffectedNodes, ArchiveChanges, ArchivedStream, Assignment, EndedEntry,
    JobArchive, MAIN_NODE_EXITED, State, listed_in_order, merge_by_seq, stream_listed,
};

/// The log group AWS Batch writes job output to, unless a definition names another.
pub const DEFAULT_LOG_GROUP: &str = "/aws/batch/job";
pub use validate::ConfigError;

/// The command level of this release: what its control nodes can apply. A cluster's level
/// ([`State::cluster_level`]) is the lowest of its control nodes', raised by the leader with
/// `SetClusterLevel` once every node reports it; what a level brought is proposed only once
/// the cluster is at that level, so a node of the release before never meets a command or a
/// field it would refuse or misapply.
///
/// 1: every release before levels were counted (the level of a state that records none);
/// 2: multi-node jobs (`nodeProperties` on a definition, `nodeOverrides` on a submit);
/// 3: `ArchiveEnded` (ended jobs leave memory) and `SetClusterLevel` itself;
/// 4: `ReinstateAgent` (a revoked agent's name may join again).
pub const COMMAND_LEVEL: u32 = 4;

/// The level that brought multi-node jobs.
pub const LEVEL_MULTINODE: u32 = 2;

/// The level that brought `ArchiveEnded`.
pub const LEVEL_ARCHIVE_ENDED: u32 = 3;

/// The level that brought `ReinstateAgent`.
pub const LEVEL_REINSTATE_AGENT: u32 = 4;

/// How far apart the clocks of the control nodes that sign agent certificates may be. A
/// certificate of a reinstated agent counts as issued before its revocation unless its issue
/// time is later than the revocation by more than this.
pub const CERTIFICATE_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// How long after its revocation an agent may be reinstated: twice the skew, so that a
/// certificate signed at the reinstatement is later than the revocation by more than
/// [`CERTIFICATE_CLOCK_SKEW`] on any signer's clock.
pub const REINSTATE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Version of the serialized [`State`] inside a snapshot; bumped on any incompatible change.
/// 2: ended jobs leave the job table for an archive (`ended` lists them) that a snapshot sent
/// to another node carries after its image. A node of the release before refuses such a
/// snapshot instead of losing them.
pub const STATE_FORMAT_VERSION: u32 = 2;

/// The state formats this release reads: format 1 is format 2 with every ended job still in
/// the job table (they stay there until retention forgets them).
pub const READABLE_STATE_FORMATS: std::ops::RangeInclusive<u32> = 1..=STATE_FORMAT_VERSION;
