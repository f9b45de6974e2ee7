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
pub use state::{ATTEMPT_TIMED_OUT, AffectedNodes, Assignment, MAIN_NODE_EXITED, State};
pub use validate::ConfigError;

/// Version of the serialized [`State`] inside a snapshot; bumped on any incompatible change.
pub const STATE_FORMAT_VERSION: u32 = 1;
