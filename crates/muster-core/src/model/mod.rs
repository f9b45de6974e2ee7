//! The resources users create and the jobs they submit, as the state machine stores them.

mod access;
mod definition;
mod environment;
mod iam;
mod job;
mod multinode;
mod node;

pub use access::*;
pub use definition::*;
pub use environment::*;
pub use iam::*;
pub use job::*;
pub use multinode::*;
pub use node::*;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// User tags on a resource (`tags` in the AWS API). Ordered so that state serializes
/// identically on every node.
pub type Tags = BTreeMap<String, String>;

/// Request members kept verbatim, by their AWS name, and echoed back on describe.
pub type Extra = BTreeMap<String, serde_json::Value>;

/// `ENABLED | DISABLED`, shared by compute environments and job queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnabledState {
    Enabled,
    Disabled,
}

impl EnabledState {
    pub fn as_aws(self) -> &'static str {
        match self {
            EnabledState::Enabled => "ENABLED",
            EnabledState::Disabled => "DISABLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ENABLED" => Some(EnabledState::Enabled),
            "DISABLED" => Some(EnabledState::Disabled),
            _ => None,
        }
    }
}
