//! Jobs and their attempts.

use super::{ContainerSpec, Tags};
use crate::{Arn, JobId, NodeId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// AWS Batch's job states, in lifecycle order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobStatus {
    Submitted,
    Pending,
    Runnable,
    Starting,
    Running,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Submitted,
        JobStatus::Pending,
        JobStatus::Runnable,
        JobStatus::Starting,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
    ];

    pub fn as_aws(self) -> &'static str {
        match self {
            JobStatus::Submitted => "SUBMITTED",
            JobStatus::Pending => "PENDING",
            JobStatus::Runnable => "RUNNABLE",
            JobStatus::Starting => "STARTING",
            JobStatus::Running => "RUNNING",
            JobStatus::Succeeded => "SUCCEEDED",
            JobStatus::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        JobStatus::ALL.into_iter().find(|st| st.as_aws() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }

    /// STARTING or RUNNING: the job holds resources on a node.
    pub fn is_placed(self) -> bool {
        matches!(self, JobStatus::Starting | JobStatus::Running)
    }
}

/// The attempt in flight: where it was placed and by which leader term (for fencing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAttempt {
    /// 1-based attempt number; reports for any other number are stale and ignored.
    pub number: u32,
    pub node: NodeId,
    /// Raft term of the leader whose plan placed it.
    pub term: u64,
    pub placed_at: Timestamp,
    pub started_at: Option<Timestamp>,
    /// NVML indices of the GPUs the attempt holds on its node.
    #[serde(default)]
    pub gpus: Vec<u32>,
}

/// One finished attempt (`attempts[]` in DescribeJobs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub node: NodeId,
    pub started_at: Option<Timestamp>,
    pub stopped_at: Timestamp,
    pub exit_code: Option<i32>,
    /// Short container-level reason (`container.reason`).
    pub reason: Option<String>,
    pub status_reason: String,
    pub log_stream_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Position in submission (log) order; FIFO and listings follow it.
    pub seq: u64,
    pub arn: Arn,
    pub name: String,
    pub queue: String,
    /// ARN of the exact definition revision the job was submitted from.
    pub definition_arn: Arn,
    pub status: JobStatus,
    pub status_reason: Option<String>,
    /// The container after submit-time overrides.
    pub container: ContainerSpec,
    pub parameters: BTreeMap<String, String>,
    pub tags: Tags,
    pub created_at: Timestamp,
    /// When the latest attempt reached RUNNING.
    pub started_at: Option<Timestamp>,
    pub stopped_at: Option<Timestamp>,
    pub active: Option<ActiveAttempt>,
    pub attempts: Vec<AttemptRecord>,
    /// Set by TerminateJob on a placed job: the agent stops it, and the attempt ends FAILED
    /// with this reason.
    pub terminate_reason: Option<String>,
    pub is_terminated: bool,
    /// Ended by CancelJob before it was placed.
    #[serde(default)]
    pub is_cancelled: bool,
}

impl Job {
    /// The CloudWatch-shaped stream name the agent writes the attempt's output under.
    pub fn log_stream_name(&self, attempt: u32) -> String {
        format!("{}/default/{}-{}", self.name, self.id, attempt)
    }
}
