//! Commands: the only way replicated state changes. Each carries every input apply needs,
//! including ids and time stamped before proposing.

use crate::{
    ComputeEnvironment, ContainerOverrides, JobDefinitionSpec, JobId, JobQueue, NodeId,
    NodeInventory, Tags, Timestamp,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    CreateComputeEnvironment(ComputeEnvironment),
    /// The queue's `compute_environment_order` may name environments by name or ARN;
    /// apply resolves them to names.
    CreateJobQueue(JobQueue),
    RegisterJobDefinition(JobDefinitionSpec),
    SubmitJob(JobSubmission),
    /// Submits that reached one node together, committed as one entry and applied in order
    /// as if each were a `SubmitJob`; the outcome is [`Outcome::Each`], one per submit.
    SubmitJobs(Vec<JobSubmission>),
    TerminateJob {
        job: JobId,
        reason: String,
        at: Timestamp,
    },
    /// An agent joining (or re-joining) the compute environment named in its config.
    RegisterNode {
        node: NodeId,
        compute_environment: String,
        inventory: NodeInventory,
        at: Timestamp,
    },
    /// One scheduling round's placements, already checked by the leader's plan applier;
    /// apply checks each again and refuses those that no longer fit.
    Place {
        term: u64,
        at: Timestamp,
        placements: Vec<Placement>,
    },
    /// An agent's report about one attempt. Reports for any attempt other than the job's
    /// active one are stale and ignored.
    ReportAttempt {
        job: JobId,
        attempt: u32,
        node: NodeId,
        event: AttemptEvent,
        at: Timestamp,
    },
    /// Many agents' reports in one entry, applied in order as if each were a
    /// `ReportAttempt` (the agent gateway batches what arrives together).
    ReportAttempts {
        reports: Vec<AttemptReport>,
        at: Timestamp,
    },
    /// Users, access keys and policies.
    Iam(IamCommand),
    /// Join tokens and revoked agents.
    Access(AccessCommand),
    /// The leader stopped hearing from a node: it is lost, and the attempts it ran fail with
    /// `Host <node> terminated.` (and are retried as their strategy says).
    NodeLost {
        node: NodeId,
        at: Timestamp,
    },
    /// A node's agent reports it cannot run jobs (`reason`), or, with `None`, that it can
    /// again. Nothing is placed on an unhealthy node; what runs there ends as the agent
    /// reports it.
    NodeHealth {
        node: NodeId,
        unhealthy: Option<String>,
        at: Timestamp,
    },
    /// Why RUNNABLE jobs still wait, as the leader's planner saw it (`statusReason`). Jobs that
    /// are no longer RUNNABLE when this applies are left alone.
    SetWaitReasons {
        reasons: Vec<(JobId, String)>,
    },
    /// RUNNABLE jobs the leader's scheduler ends, each FAILED and cancelled with its reason
    /// (and its dependents with it): those no node could ever hold
    /// (`MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - …`) and those past their queue's
    /// `jobStateTimeLimitActions` (the action's reason), all of a round in one entry. Jobs no
    /// longer RUNNABLE when this applies are left alone.
    FailUnplaceable {
        jobs: Vec<(JobId, String)>,
        at: Timestamp,
    },
    /// Forget jobs that ended before `before` (retention), and join tokens that expired
    /// before it.
    PurgeJobs {
        before: Timestamp,
    },
    /// Move job families that ended before `before` out of memory into the archive, oldest
    /// first, starting no new family once `max_jobs` jobs have moved (a family moves whole).
    ArchiveEnded {
        before: Timestamp,
        max_jobs: u32,
    },
    /// Raise the cluster's command level to `level` (never lower it): the leader proposes it
    /// once every control node reports a release of at least that level, and only then
    /// proposes what that level brought (see [`crate::COMMAND_LEVEL`]).
    SetClusterLevel {
        level: u32,
    },
    /// Changes to compute environments, queues, definitions, policies and tags after creation,
    /// and cancelling jobs.
    Admin(AdminCommand),
}

/// Changes to who may call the API. Ids and secrets are chosen by the node that accepted the
/// request, before proposing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IamCommand {
    CreateUser {
        name: String,
        user_id: String,
        at: Timestamp,
    },
    DeleteUser {
        name: String,
    },
    CreateAccessKey {
        user: String,
        id: String,
        secret: String,
        at: Timestamp,
    },
    DeleteAccessKey {
        user: String,
        id: String,
    },
    PutUserPolicy {
        user: String,
        policy_name: String,
        policy: crate::Policy,
    },
    DeleteUserPolicy {
        user: String,
        policy_name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccessCommand {
    /// A new join token (see [`crate::JoinToken`]).
    CreateJoinToken(crate::JoinToken),
    /// No agent joins with token `id` from now on (those that did keep their certificates:
    /// revoke them by name).
    RevokeJoinToken { id: String },
    /// The agent `node` is cut off: every call its certificate makes is refused from now on,
    /// and it does not join again under that name until reinstated. Its running attempts end
    /// when the leader marks the node lost.
    RevokeAgent { node: crate::NodeId, at: Timestamp },
    /// The revoked agent `node` may join again (with a join token, for a new certificate);
    /// every certificate issued for that name before its revocation stays refused. Refused
    /// until [`crate::REINSTATE_AFTER`] has passed since the revocation, so that clocks of
    /// the signing nodes cannot make an old certificate pass for a new one.
    ReinstateAgent { node: crate::NodeId, at: Timestamp },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminCommand {
    /// The region and account every ARN names: proposed once by the node that founds the
    /// cluster, from its `region` and `account_id` settings, before anything with an ARN exists.
    SetArnScope(crate::ArnScope),
    /// Stop placing new attempts on a worker (`draining`), or place them there again.
    DrainNode {
        node: crate::NodeId,
        draining: bool,
    },
    UpdateComputeEnvironment {
        /// Name or ARN.
        compute_environment: String,
        state: Option<crate::EnabledState>,
        unmanaged_vcpus: Option<i64>,
        service_role: Option<String>,
        /// Members replaced as sent.
        extra: crate::Extra,
    },
    DeleteComputeEnvironment {
        compute_environment: String,
    },
    UpdateJobQueue {
        job_queue: String,
        state: Option<crate::EnabledState>,
        priority: Option<i64>,
        compute_environment_order: Option<Vec<crate::CeOrder>>,
        scheduling_policy_arn: Option<String>,
        #[serde(default)]
        time_limit_actions: Option<Vec<crate::TimeLimitAction>>,
        extra: crate::Extra,
    },
    /// The queue's jobs that have not ended fail (or are stopped, if running).
    DeleteJobQueue {
        job_queue: String,
        at: Timestamp,
    },
    DeregisterJobDefinition {
        job_definition: String,
    },
    /// Fails a job that has not reached STARTING; does nothing to one already placed.
    CancelJob {
        job: JobId,
        reason: String,
        at: Timestamp,
    },
    CreateSchedulingPolicy(crate::SchedulingPolicy),
    UpdateSchedulingPolicy {
        arn: String,
        fairshare: Option<crate::FairsharePolicy>,
    },
    DeleteSchedulingPolicy {
        arn: String,
    },
    TagResource {
        arn: String,
        tags: Tags,
    },
    UntagResource {
        arn: String,
        keys: Vec<String>,
    },
}

/// SubmitJob's inputs, as the receiving node stamped them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmission {
    pub id: JobId,
    pub at: Timestamp,
    pub name: String,
    /// Queue name or ARN, as the user gave it.
    pub queue: String,
    /// `name`, `name:revision` or ARN, as the user gave it.
    pub definition: String,
    pub overrides: ContainerOverrides,
    pub parameters: BTreeMap<String, String>,
    pub tags: Tags,
    /// Replaces the definition's.
    #[serde(default)]
    pub retry: Option<crate::RetryStrategy>,
    /// Replaces the definition's.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub depends_on: Vec<crate::Dependency>,
    /// `arrayProperties.size`: 2 to 10,000 children.
    #[serde(default)]
    pub array_size: Option<u32>,
    /// `shareIdentifier`: the fair-share group the job is charged to.
    #[serde(default)]
    pub share_identifier: Option<String>,
    /// `schedulingPriorityOverride` (0 to 9999).
    #[serde(default)]
    pub scheduling_priority_override: Option<i64>,
    /// Members echoed as sent and not acted on (`propagateTags`, …).
    #[serde(default)]
    pub extra: crate::Extra,
    /// `nodeOverrides`, for a `multinode` definition only.
    #[serde(default)]
    pub node_overrides: Option<crate::NodeOverrides>,
}

/// One report inside [`Command::ReportAttempts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    pub job: JobId,
    pub attempt: u32,
    pub node: NodeId,
    pub event: AttemptEvent,
}

/// One job attempt placed on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub job: JobId,
    pub node: NodeId,
    /// NVML indices of the node's GPUs given to the attempt; exactly as many as it asks for.
    #[serde(default)]
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptEvent {
    /// The container (or process) is running.
    Running,
    /// The attempt ended. `exit_code` is `None` when it never started (for example the image
    /// could not be found); `reason` then says why.
    Exited {
        exit_code: Option<i32>,
        reason: Option<String>,
    },
}

/// Why a command was refused: the offending request field and a message naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub field: String,
    pub message: String,
}

impl Rejection {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What applying a command produced; returned to the proposer after commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    DefinitionRegistered {
        name: String,
        revision: u32,
        arn: String,
    },
    JobSubmitted {
        id: JobId,
        arn: String,
        name: String,
    },
    Placed {
        placed: usize,
        refused: usize,
    },
    Purged {
        jobs: usize,
    },
    /// `jobs` moved to the archive; `more`: others were due but past the command's limit.
    Archived {
        jobs: usize,
        more: bool,
    },
    /// The command had no effect (a stale report, a repeated terminate).
    Ignored(String),
    Rejected(Rejection),
    /// One outcome per command of a batch, in order.
    Each(Vec<Outcome>),
}
