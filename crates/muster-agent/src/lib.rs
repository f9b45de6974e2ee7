//! `muster-agent`: the worker agent.
//!
//! It registers its machine ([`inventory`]) into the compute environment named in its config,
//! heartbeats, and holds a stream of the attempts the leader wants it to run. Each message of
//! that stream is the complete set (level-triggered), so the agent reconciles: it starts what
//! is new, stops what is no longer listed (TerminateJob, a superseded attempt), and reports
//! every attempt's RUNNING and exit. Sets from a leader term older than the newest one seen
//! are ignored (fencing).
//!
//! Jobs run through an [`executor::Executor`]: Docker (bollard) or plain processes. Their
//! output stays on the agent's disk and is served to control nodes by [`logs`].

mod agent;
mod attempt;
pub mod backoff;
mod config;
pub mod executor;
mod heartbeat;
pub mod inventory;
pub mod join;
pub mod lease;
pub mod logs;
mod renewal;
pub mod reporter;
pub mod warden;

pub use agent::{Agent, AgentError};
pub use config::{AgentConfig, Allowances, ExecutorKind, ImagePull, RawAgentConfig};
