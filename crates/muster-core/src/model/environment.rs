//! Compute environments (where jobs may run) and job queues (how they wait).

use super::{EnabledState, Extra, Tags};
use crate::{Arn, Timestamp};
use serde::{Deserialize, Serialize};

/// `MANAGED | UNMANAGED`. Muster's agents join UNMANAGED environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CeType {
    Managed,
    Unmanaged,
}

impl CeType {
    pub fn as_aws(self) -> &'static str {
        match self {
            CeType::Managed => "MANAGED",
            CeType::Unmanaged => "UNMANAGED",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeEnvironment {
    pub name: String,
    pub arn: Arn,
    /// Stable id reported as `uuid`, chosen by the node that accepted the create.
    pub uuid: String,
    pub ce_type: CeType,
    pub state: EnabledState,
    pub unmanaged_vcpus: Option<i64>,
    pub service_role: Option<String>,
    pub tags: Tags,
    pub created_at: Timestamp,
    /// Members Muster stores and echoes but does not act on (`computeResources` of a MANAGED
    /// environment, `eksConfiguration`, `updatePolicy`, `context`), as the user sent them.
    #[serde(default)]
    pub extra: Extra,
}

/// One entry of a queue's `computeEnvironmentOrder`: lower `order` is tried first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeOrder {
    pub order: i64,
    /// Name of the compute environment (resolved from the ARN or name the user gave).
    pub compute_environment: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobQueue {
    pub name: String,
    pub arn: Arn,
    /// Higher is served first among queues that share a compute environment.
    pub priority: i64,
    pub state: EnabledState,
    /// Sorted by `order` ascending when stored.
    pub compute_environment_order: Vec<CeOrder>,
    pub tags: Tags,
    pub created_at: Timestamp,
    #[serde(default)]
    pub scheduling_policy_arn: Option<String>,
    /// Members stored and echoed as sent (`jobStateTimeLimitActions`, `jobQueueType`, …).
    #[serde(default)]
    pub extra: Extra,
}

/// A fair-share scheduling policy (stored; the planner's use of it comes with fair share).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulingPolicy {
    pub name: String,
    pub arn: Arn,
    /// `fairsharePolicy` as validated and sent.
    pub fairshare: Option<serde_json::Value>,
    pub tags: Tags,
}
