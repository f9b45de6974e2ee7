//! Jobs and their attempts.

use super::{ContainerSpec, Tags};
use crate::ids::ArnScope;
use crate::{Arn, JobId, NodeId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

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

/// `retryStrategy`: how many attempts a job gets, and which failures are worth another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryStrategy {
    /// 1 to 10, counting the first attempt.
    pub attempts: u32,
    /// Checked in order; the first rule that matches decides. No match means retry.
    pub evaluate_on_exit: Vec<ExitRule>,
}

impl Default for RetryStrategy {
    fn default() -> Self {
        Self {
            attempts: 1,
            evaluate_on_exit: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryAction {
    Retry,
    Exit,
}

/// One `evaluateOnExit` rule. Patterns may end in `*` (a prefix match); every pattern given
/// must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRule {
    pub on_status_reason: Option<String>,
    pub on_reason: Option<String>,
    pub on_exit_code: Option<String>,
    pub action: RetryAction,
}

impl RetryStrategy {
    /// Whether a failed attempt (`attempts_made` so far) earns another.
    pub fn retries(
        &self,
        attempts_made: u32,
        exit_code: Option<i32>,
        reason: Option<&str>,
        status_reason: &str,
    ) -> bool {
        if attempts_made >= self.attempts {
            return false;
        }
        let matches = |pattern: &Option<String>, value: Option<&str>| match pattern {
            None => true,
            Some(p) => value.is_some_and(|v| crate::glob(p, v)),
        };
        let code = exit_code.map(|c| c.to_string());
        let rule = self.evaluate_on_exit.iter().find(|r| {
            matches(&r.on_status_reason, Some(status_reason))
                && matches(&r.on_reason, reason)
                && matches(&r.on_exit_code, code.as_deref())
        });
        rule.is_none_or(|r| r.action == RetryAction::Retry)
    }
}

/// `dependsOn[].type`: plain (no type), `N_TO_N` or `SEQUENTIAL` (array jobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DependencyKind {
    Plain,
    NToN,
    Sequential,
}

impl DependencyKind {
    pub fn as_aws(self) -> Option<&'static str> {
        match self {
            DependencyKind::Plain => None,
            DependencyKind::NToN => Some("N_TO_N"),
            DependencyKind::Sequential => Some("SEQUENTIAL"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// `None` only for SEQUENTIAL, which links the children of the job's own array.
    pub job: Option<JobId>,
    pub kind: DependencyKind,
}

/// Where a job sits in an array job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArrayRole {
    /// Never runs itself; its status follows its children.
    Parent { size: u32, ended: u32, failed: u32 },
    /// Its id is `<parent id>:<index>`.
    Child { index: u32, size: u32 },
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

/// Tag prefix by which a job requires a node label: `muster:node.rack=r12`.
pub const NODE_LABEL_TAG_PREFIX: &str = "muster:node.";

/// Tag by which a job requires a GPU model: `muster:gpu-model=NVIDIA H100 80GB HBM3`.
pub const GPU_MODEL_TAG: &str = "muster:gpu-model";

/// Tag by which a job requires a high-speed fabric: `muster:fabric=efa` (AWS EFA adapters) or
/// `muster:fabric=rdma` (any RDMA device: InfiniBand, RoCE, EFA). A container given a device
/// under `/dev/infiniband/` (`linuxParameters.devices`, as AWS asks for EFA) requires RDMA
/// without the tag.
pub const FABRIC_TAG: &str = "muster:fabric";

/// Tag by which a multi-node job bounds how its nodes spread over the network topology:
/// `required:<level>` (all nodes in one domain of that level, e.g. one `rack`), or
/// `preferred:<level>[:<seconds>]` (wait up to that long for one, then spread). Without it a
/// gang takes the tightest domain that has room now, else spreads.
pub const TOPOLOGY_TAG: &str = "muster:topology";

/// The fabric a job's containers need on their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fabric {
    /// Any RDMA device (`/sys/class/infiniband` lists one).
    Rdma,
    /// An AWS Elastic Fabric Adapter.
    Efa,
}

impl Fabric {
    /// The `muster:fabric` tag's value, if it names a fabric.
    pub fn parse(value: &str) -> Option<Fabric> {
        match value {
            "rdma" | "infiniband" => Some(Fabric::Rdma),
            "efa" => Some(Fabric::Efa),
            _ => None,
        }
    }

    /// The fabric a container needs: the tag's, else RDMA when it is given an InfiniBand
    /// device.
    pub fn required(tags: &Tags, options: &super::ContainerOptions) -> Option<Fabric> {
        tags.get(FABRIC_TAG)
            .and_then(|v| Fabric::parse(v))
            .or_else(|| {
                options
                    .devices
                    .iter()
                    .any(|d| d.host_path.starts_with("/dev/infiniband/"))
                    .then_some(Fabric::Rdma)
            })
    }

    /// Whether a node with these labels (as its agent reports them) has the fabric.
    pub fn offered_by(self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Fabric::Rdma => labels.get("rdma-devices").is_some_and(|d| !d.is_empty()),
            Fabric::Efa => labels.get("efa").is_some_and(|e| e == "true"),
        }
    }
}

/// How a multi-node job's nodes may spread over the topology (the `muster:topology` tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyBound {
    /// The level (`rack`, `switch`, …) whose one domain should hold every node.
    pub level: String,
    /// Never spread over more than one domain of `level`.
    pub required: bool,
    /// How long to wait for one domain before spreading (`preferred` only); none: forever.
    pub max_wait_secs: Option<u64>,
}

impl TopologyBound {
    /// Parses the tag's value; `Err` says what is wrong with it.
    pub fn parse(value: &str) -> Result<TopologyBound, String> {
        let bad = || {
            format!(
                "{value}: must be required:<level> or preferred:<level>[:<seconds>] (a level such as rack or switch)"
            )
        };
        let mut parts = value.split(':');
        let kind = parts.next().unwrap_or_default();
        let level = parts.next().filter(|l| !l.is_empty()).ok_or_else(bad)?;
        let max_wait_secs = match parts.next() {
            None => None,
            Some(secs) => Some(secs.parse::<u64>().map_err(|_| bad())?),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        match kind {
            "required" if max_wait_secs.is_none() => Ok(TopologyBound {
                level: level.to_owned(),
                required: true,
                max_wait_secs: None,
            }),
            "preferred" => Ok(TopologyBound {
                level: level.to_owned(),
                required: false,
                max_wait_secs,
            }),
            _ => Err(bad()),
        }
    }
}

/// What one SubmitJob fixed for good. A job holds it behind an `Arc`, and an array's parent
/// and all its children hold the same one: a 10,000-child array keeps one copy of its
/// container, parameters and tags, not 10,001.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub queue: String,
    /// ARN of the exact definition revision the job was submitted from.
    pub definition_arn: Arn,
    /// The container after submit-time overrides.
    pub container: ContainerSpec,
    pub parameters: BTreeMap<String, String>,
    /// The submit's tags with the definition's added (see [`Job::reported_tags`]).
    pub tags: Tags,
    #[serde(default)]
    pub retry: RetryStrategy,
    /// `timeout.attemptDurationSeconds`: each attempt is stopped after this long.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// `dependsOn` as submitted (array children report none: theirs is in `waiting_on`).
    #[serde(default)]
    pub depends_on: Vec<Dependency>,
    /// `shareIdentifier`: the fair-share group the job is charged to.
    #[serde(default)]
    pub share_identifier: Option<String>,
    /// `schedulingPriorityOverride`, else the definition's `schedulingPriority`, else 0.
    /// Higher runs first within a share identifier of a fair-share queue.
    #[serde(default)]
    pub scheduling_priority: i64,
    /// Submit members stored and echoed as sent (`shareIdentifier`, `propagateTags`, …).
    #[serde(default)]
    pub extra: super::Extra,
    /// A multi-node job's `nodeProperties` after its `nodeOverrides`, shared by the parent and
    /// its node jobs (each of which holds its own range's container in `container`).
    #[serde(default)]
    pub node_properties: Option<Arc<super::NodeProperties>>,
    /// The fabric its container needs on its node (see [`FABRIC_TAG`]).
    #[serde(default)]
    pub fabric: Option<Fabric>,
}

/// One job: the submit it came from ([`JobSpec`], shared) and where it is in its life. Kept
/// small, because a deep queue holds a million of these on every control node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Position in submission (log) order; FIFO and listings follow it.
    pub seq: u64,
    /// Written once per run of jobs that share it by the state's job table, not per job.
    #[serde(skip)]
    pub spec: Arc<JobSpec>,
    pub status: JobStatus,
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
    /// When the latest attempt reached RUNNING.
    pub started_at: Option<Timestamp>,
    pub stopped_at: Option<Timestamp>,
    pub active: Option<Box<ActiveAttempt>>,
    pub attempts: Vec<AttemptRecord>,
    /// Set by TerminateJob on a placed job: the agent stops it, and the attempt ends FAILED
    /// with this reason.
    pub terminate_reason: Option<String>,
    pub is_terminated: bool,
    /// Ended by CancelJob before it was placed.
    #[serde(default)]
    pub is_cancelled: bool,
    /// The dependencies that have not succeeded yet; the job is PENDING while any remain.
    #[serde(default)]
    pub waiting_on: std::collections::BTreeSet<JobId>,
    #[serde(default)]
    pub array: Option<ArrayRole>,
    /// When the job last became RUNNABLE (for `jobStateTimeLimitActions`).
    #[serde(default)]
    pub runnable_since: Option<Timestamp>,
    /// Where the job sits in a multi-node job. Boxed: most jobs are not in one.
    #[serde(default)]
    pub multinode: Option<Box<super::MultiNodeRole>>,
}

impl Job {
    /// `arn:aws:batch:<region>:<account>:job/<id>`, made when asked rather than stored with
    /// every job.
    pub fn arn(&self, scope: &ArnScope) -> Arn {
        scope.arn("job", &self.id.0)
    }

    /// The array parent's id, for a child.
    pub fn array_parent(&self) -> Option<JobId> {
        match self.array {
            Some(ArrayRole::Child { .. }) => self
                .id
                .0
                .rsplit_once(':')
                .map(|(parent, _)| JobId::from(parent.to_owned())),
            _ => None,
        }
    }

    /// For a node of a multi-node job: the parent's id, its index, and whether it is the
    /// main node.
    pub fn gang_node(&self) -> Option<(JobId, u32, bool)> {
        match self.multinode.as_deref()? {
            super::MultiNodeRole::Node {
                index, main_node, ..
            } => {
                let (parent, _) = self.id.0.rsplit_once('#')?;
                Some((JobId::from(parent.to_owned()), *index, index == main_node))
            }
            super::MultiNodeRole::Parent { .. } => None,
        }
    }

    /// For a multi-node job's parent: how many nodes it has.
    pub fn gang_size(&self) -> Option<u32> {
        match self.multinode.as_deref()? {
            super::MultiNodeRole::Parent { num_nodes, .. } => Some(*num_nodes),
            super::MultiNodeRole::Node { .. } => None,
        }
    }

    /// Tags as DescribeJobs reports them: array children carry no tags of their own (they
    /// cannot be tagged), though they obey the `muster:` requirements of their parent's.
    pub fn reported_tags(&self) -> &Tags {
        static NONE: Tags = Tags::new();
        match self.array {
            Some(ArrayRole::Child { .. }) => &NONE,
            _ => &self.spec.tags,
        }
    }

    /// `dependsOn` as DescribeJobs reports it: an array child has none of its own.
    pub fn reported_depends_on(&self) -> &[Dependency] {
        match self.array {
            Some(ArrayRole::Child { .. }) => &[],
            _ => &self.spec.depends_on,
        }
    }

    /// Node labels the job requires (`muster:node.<label>` tags, from the submit or the
    /// definition): `(label, value)` pairs a node must carry to run it.
    pub fn required_labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.spec.tags.iter().filter_map(|(k, v)| {
            k.strip_prefix(NODE_LABEL_TAG_PREFIX)
                .map(|label| (label, v.as_str()))
        })
    }

    /// The GPU model the job requires (the `muster:gpu-model` tag), matched against the
    /// model name NVML reports.
    pub fn required_gpu_model(&self) -> Option<&str> {
        self.spec.tags.get(GPU_MODEL_TAG).map(String::as_str)
    }

    /// How a multi-node job's nodes may spread over the topology (its `muster:topology` tag,
    /// checked at submit).
    pub fn topology_bound(&self) -> Option<TopologyBound> {
        self.spec
            .tags
            .get(TOPOLOGY_TAG)
            .and_then(|v| TopologyBound::parse(v).ok())
    }

    /// The CloudWatch-shaped stream name the agent writes the attempt's output under.
    pub fn log_stream_name(&self, attempt: u32) -> String {
        format!("{}/default/{}-{}", self.spec.name, self.id, attempt)
    }
}
