//! The replicated state and `apply`.

use crate::command::JobSubmission;
use crate::ids::ArnScope;
use crate::{
    ActiveAttempt, AttemptEvent, AttemptRecord, CeType, Command, ComputeEnvironment,
    DefinitionStatus, EnabledState, Job, JobDefinition, JobDefinitionSpec, JobId, JobQueue,
    JobStatus, Node, NodeId, NodeInventory, NodeStatus, Outcome, Placement, Rejection, Resources,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

mod iam;
mod invariants;
mod job_table;
mod lifecycle;
mod resources;
mod runnable;

/// AWS's reason for an attempt whose container ran and exited.
const CONTAINER_EXITED: &str = "Essential container in task exited";

/// AWS's reason for an attempt stopped at its `attemptDurationSeconds`; agents report it.
pub const ATTEMPT_TIMED_OUT: &str = "Job attempt duration exceeded timeout";

/// Everything the control plane agrees on. Identical on every node that applied the same log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    scope: ArnScope,
    compute_environments: BTreeMap<String, ComputeEnvironment>,
    queues: BTreeMap<String, JobQueue>,
    /// Revisions of each definition name, revision `n` at index `n - 1`.
    definitions: BTreeMap<String, Vec<JobDefinition>>,
    /// Boxed: a map node holds eleven entries and is often half full, and a `Job` inline
    /// (216 bytes) made that slack cost more than the job itself.
    #[serde(with = "job_table")]
    jobs: BTreeMap<JobId, Box<Job>>,
    nodes: BTreeMap<NodeId, Node>,
    scheduling_policies: BTreeMap<String, crate::SchedulingPolicy>,
    users: BTreeMap<String, crate::User>,
    /// Client tokens of submits (the `muster:client-token` tag) and the job each created, so
    /// that a retried SubmitJob returns the first job instead of making a second.
    #[serde(default)]
    client_tokens: BTreeMap<String, JobId>,
    /// Access keys by id.
    access_keys: BTreeMap<String, crate::AccessKey>,

    /// Submission order: the next job's `seq`. Log order, not clocks, decides who came first.
    #[serde(default)]
    next_job_seq: u64,
    /// RUNNABLE jobs per queue, for the scheduler. Derived from `jobs`.
    #[serde(skip)]
    runnable: runnable::RunnableIndex,
    /// Past use of each fair-share identifier, per queue: queue → share → usage.
    #[serde(default)]
    share_usage: BTreeMap<String, BTreeMap<String, crate::ShareUsage>>,
    /// Millicpus held now by placed jobs of each share identifier, per queue. Derived.
    #[serde(skip)]
    share_running: BTreeMap<String, BTreeMap<String, u64>>,
    /// For each job, the PENDING jobs waiting on it. Derived from `jobs` (`waiting_on`).
    #[serde(skip)]
    dependents: BTreeMap<JobId, BTreeSet<JobId>>,
    /// All jobs per queue in submit order, for ListJobs. Derived from `jobs`.
    #[serde(skip)]
    jobs_by_queue: BTreeMap<String, BTreeSet<(u64, JobId)>>,
    /// Counts applied commands that may let the scheduler place something it could not
    /// before; see [`State::placement_epoch`]. Not stored: it starts again at 0 on load.
    #[serde(skip)]
    placement_epoch: u64,
}

/// See [`State::nodes_affected_by`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffectedNodes {
    Some(Vec<NodeId>),
    All,
}

/// How a job is ended by a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Terminate,
    Cancel,
}

/// What an agent must be running: one per active attempt placed on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    pub attempt: u32,
    /// Term of the leader whose plan placed the attempt.
    pub term: u64,
    pub image: String,
    pub command: Vec<String>,
    /// The job's environment followed by the `AWS_BATCH_*` variables Muster sets.
    pub environment: Vec<(String, String)>,
    pub resources: Resources,
    pub log_stream_name: String,
    /// The node's GPUs given to this attempt (empty when it asked for none).
    pub gpus: Vec<crate::GpuDevice>,
    /// Stop the attempt after this long (`attemptDurationSeconds`).
    pub timeout_secs: Option<u64>,
    /// Volumes, mount points, user, read-only root, ulimits from the definition.
    pub options: crate::ContainerOptions,
}

impl State {
    /// Rebuilds the derived indexes after the state was read from a snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.runnable.clear();
        self.share_running.clear();
        self.jobs_by_queue.clear();
        self.dependents.clear();
        for node in self.nodes.values_mut() {
            node.allocated_unbounded = Resources::ZERO;
        }
        for job in self.jobs.values() {
            let key = (job.seq, job.id.clone());
            self.jobs_by_queue
                .entry(job.spec.queue.clone())
                .or_default()
                .insert(key.clone());
            if job.status == JobStatus::Runnable {
                self.runnable.insert(job);
            }
            if let Some(active) = &job.active {
                track_share(&mut self.share_running, job, true);
                if job.spec.timeout_secs.is_none()
                    && let Some(node) = self.nodes.get_mut(&active.node)
                {
                    node.allocated_unbounded =
                        node.allocated_unbounded + job.spec.container.resources();
                }
            }
            for dep in &job.waiting_on {
                self.dependents
                    .entry(dep.clone())
                    .or_default()
                    .insert(job.id.clone());
            }
        }
    }

    pub fn arn_scope(&self) -> &ArnScope {
        &self.scope
    }

    pub fn compute_environments(&self) -> impl Iterator<Item = &ComputeEnvironment> {
        self.compute_environments.values()
    }

    pub fn queues(&self) -> impl Iterator<Item = &JobQueue> {
        self.queues.values()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id).map(|job| &**job)
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Every job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().map(|job| &**job)
    }

    /// Every revision of every definition, by name then revision.
    pub fn definitions(&self) -> impl Iterator<Item = &JobDefinition> {
        self.definitions.values().flatten()
    }

    /// Finds a compute environment by name or ARN.
    pub fn compute_environment(&self, name_or_arn: &str) -> Option<&ComputeEnvironment> {
        let name = name_or_arn.rsplit('/').next().unwrap_or(name_or_arn);
        self.compute_environments
            .get(name)
            .filter(|ce| name == name_or_arn || ce.arn.0 == name_or_arn)
    }

    /// Finds a job queue by name or ARN.
    pub fn queue(&self, name_or_arn: &str) -> Option<&JobQueue> {
        let name = name_or_arn.rsplit('/').next().unwrap_or(name_or_arn);
        self.queues
            .get(name)
            .filter(|q| name == name_or_arn || q.arn.0 == name_or_arn)
    }

    /// Resolves `name`, `name:revision`, or an ARN with or without `:revision`. Without a
    /// revision the latest ACTIVE one is meant.
    pub fn definition(&self, reference: &str) -> Option<&JobDefinition> {
        let tail = match reference.strip_prefix("arn:") {
            Some(_) => reference.rsplit_once("job-definition/")?.1,
            None => reference,
        };
        let (name, revision) = match tail.rsplit_once(':') {
            Some((name, rev)) => (name, Some(rev.parse::<u32>().ok()?)),
            None => (tail, None),
        };
        let revisions = self.definitions.get(name)?;
        match revision {
            Some(r) => revisions.get((r as usize).checked_sub(1)?),
            None => revisions
                .iter()
                .rev()
                .find(|d| d.status == DefinitionStatus::Active),
        }
    }

    /// Jobs of a queue in submit order, optionally only those with `status`.
    pub fn jobs_in_queue<'a>(
        &'a self,
        queue: &str,
        status: Option<JobStatus>,
    ) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs_by_queue
            .get(queue)
            .into_iter()
            .flatten()
            .filter_map(|(_, id)| self.job(id))
            .filter(move |j| status.is_none_or(|s| j.status == s))
    }

    /// How many jobs a queue holds, whatever their status (array parents included).
    pub fn job_count_in_queue(&self, queue: &str) -> usize {
        self.jobs_by_queue.get(queue).map_or(0, BTreeSet::len)
    }

    /// RUNNABLE jobs of a queue in FIFO order.
    pub fn runnable_jobs<'a>(&'a self, queue: &str) -> impl Iterator<Item = &'a Job> + 'a {
        self.runnable.fifo(queue).filter_map(|id| self.job(id))
    }

    /// How many jobs of a queue are RUNNABLE.
    pub fn runnable_count(&self, queue: &str) -> usize {
        self.runnable.count(queue)
    }

    /// RUNNABLE jobs of a queue grouped by share identifier (`""` for jobs without one),
    /// each group by scheduling priority (highest first) then submit order.
    pub fn runnable_by_share<'a>(
        &'a self,
        queue: &str,
    ) -> impl Iterator<Item = (&'a str, impl Iterator<Item = &'a Job> + 'a)> + 'a {
        self.runnable
            .shares(queue)
            .map(|(share, ids)| (share, ids.filter_map(|id| self.job(id))))
    }

    /// Millicpus that placed jobs of a share identifier of a queue hold now.
    pub fn share_running_millicpus(&self, queue: &str, share: &str) -> u64 {
        self.share_running
            .get(queue)
            .and_then(|shares| shares.get(share))
            .copied()
            .unwrap_or(0)
    }

    /// Past use of a share identifier of a queue (before decay to any later time).
    pub fn share_usage(&self, queue: &str, share: &str) -> Option<&crate::ShareUsage> {
        self.share_usage.get(queue)?.get(share)
    }

    /// What `node` should be running now: its active attempts that nobody asked to stop.
    pub fn assignments_for(&self, node: &NodeId) -> Vec<Assignment> {
        self.assignments_among(node, |_, _| true)
    }

    /// The assignments of `node` whose (job, attempt) `wanted` accepts, in the order of
    /// [`Self::assignment_keys`]: describing an assignment costs more than naming it.
    pub fn assignments_among(
        &self,
        node: &NodeId,
        wanted: impl Fn(&JobId, u32) -> bool,
    ) -> Vec<Assignment> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        self.assigned_attempts(n)
            .filter(|(job, active)| wanted(&job.id, active.number))
            .map(|(job, active)| {
                let gpus: Vec<crate::GpuDevice> = active
                    .gpus
                    .iter()
                    .map(|i| {
                        n.inventory
                            .gpus
                            .iter()
                            .find(|g| g.index == *i)
                            .cloned()
                            .unwrap_or(crate::GpuDevice {
                                index: *i,
                                uuid: String::new(),
                                model: String::new(),
                                memory_mib: 0,
                                nvlink_peers: Vec::new(),
                            })
                    })
                    .collect();
                let mut environment = job.spec.container.environment.clone();
                // Muster decides which GPUs a job sees; values the user set are replaced.
                environment.retain(|(k, _)| {
                    !k.starts_with("AWS_BATCH_")
                        && k != "NVIDIA_VISIBLE_DEVICES"
                        && k != "CUDA_VISIBLE_DEVICES"
                });
                if n.inventory.capacity.gpus > 0 || !gpus.is_empty() {
                    let uuids: Vec<&str> = gpus
                        .iter()
                        .map(|g| g.uuid.as_str())
                        .filter(|u| !u.is_empty())
                        .collect();
                    let indices: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
                    let nvidia = if gpus.is_empty() {
                        "void".to_owned()
                    } else if uuids.len() == gpus.len() {
                        uuids.join(",")
                    } else {
                        indices.join(",")
                    };
                    environment.push(("NVIDIA_VISIBLE_DEVICES".to_owned(), nvidia));
                    environment.push(("CUDA_VISIBLE_DEVICES".to_owned(), indices.join(",")));
                }
                environment.extend([
                    ("AWS_BATCH_JOB_ID".to_owned(), job.id.to_string()),
                    (
                        "AWS_BATCH_JOB_ATTEMPT".to_owned(),
                        active.number.to_string(),
                    ),
                    ("AWS_BATCH_JQ_NAME".to_owned(), job.spec.queue.clone()),
                    (
                        "AWS_BATCH_CE_NAME".to_owned(),
                        n.compute_environment.clone(),
                    ),
                ]);
                if let Some(crate::ArrayRole::Child { index, size, .. }) = &job.array {
                    environment.push(("AWS_BATCH_JOB_ARRAY_INDEX".to_owned(), index.to_string()));
                    environment.push(("AWS_BATCH_JOB_ARRAY_SIZE".to_owned(), size.to_string()));
                }
                Assignment {
                    job: job.id.clone(),
                    attempt: active.number,
                    term: active.term,
                    image: job.spec.container.image.clone(),
                    command: substitute_parameters(
                        &job.spec.container.command,
                        &job.spec.parameters,
                    ),
                    environment,
                    resources: job.spec.container.resources(),
                    log_stream_name: job.log_stream_name(active.number),
                    gpus,
                    timeout_secs: job.spec.timeout_secs,
                    options: self
                        .definition(&job.spec.definition_arn.0)
                        .and_then(|d| d.extra.get("containerProperties"))
                        .map(crate::ContainerOptions::from_properties)
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Changes whenever an applied command may have made room, work or a node for a
    /// placement: a scheduler that already planned on this epoch and placed all it could
    /// has nothing new to find until it moves (or time passes, for time-based decisions).
    /// Under load most entries are attempts reported RUNNING, which change none of that.
    pub fn placement_epoch(&self) -> u64 {
        self.placement_epoch
    }

    fn may_enable_placements(cmd: &Command) -> bool {
        match cmd {
            Command::ReportAttempt {
                event: AttemptEvent::Running,
                ..
            }
            | Command::SetWaitReasons { .. } => false,
            Command::ReportAttempts { reports, .. } => reports
                .iter()
                .any(|r| !matches!(r.event, AttemptEvent::Running)),
            _ => true,
        }
    }

    /// Which attempts [`Self::assignments_for`] would describe, as (job, attempt) in the same
    /// order: a cheap way to tell whether a node's assignments changed. What an assignment
    /// says is fixed when its attempt is placed.
    pub fn assignment_keys(&self, node: &NodeId) -> Vec<(JobId, u32)> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        self.assigned_attempts(n)
            .map(|(job, active)| (job.id.clone(), active.number))
            .collect()
    }

    /// The attempts placed on `node` that it should be running.
    fn assigned_attempts<'a>(
        &'a self,
        node: &'a Node,
    ) -> impl Iterator<Item = (&'a Job, &'a crate::ActiveAttempt)> + 'a {
        node.placed_jobs
            .iter()
            .filter_map(|id| self.job(id))
            .filter(|job| job.terminate_reason.is_none())
            .filter_map(|job| Some((job, job.active.as_deref()?)))
    }

    /// Checks a command against this state without changing it. The API calls this before
    /// proposing; apply calls it again on the state the command meets after commit.
    pub fn check(&self, cmd: &Command) -> Result<(), Rejection> {
        match cmd {
            Command::CreateComputeEnvironment(ce) => {
                crate::validate::name("computeEnvironmentName", &ce.name)?;
                if self.compute_environments.contains_key(&ce.name) {
                    return Err(Rejection::new(
                        "computeEnvironmentName",
                        format!(
                            "computeEnvironmentName: compute environment {} already exists",
                            ce.name
                        ),
                    ));
                }
                Ok(())
            }
            Command::CreateJobQueue(q) => {
                crate::validate::name("jobQueueName", &q.name)?;
                if self.queues.contains_key(&q.name) {
                    return Err(Rejection::new(
                        "jobQueueName",
                        format!("jobQueueName: job queue {} already exists", q.name),
                    ));
                }
                self.check_ce_order(&q.compute_environment_order)?;
                if let Some(arn) = &q.scheduling_policy_arn
                    && self.scheduling_policy(arn).is_none()
                {
                    return Err(Rejection::new(
                        "schedulingPolicyArn",
                        format!("schedulingPolicyArn: scheduling policy {arn} does not exist"),
                    ));
                }
                Ok(())
            }
            Command::RegisterJobDefinition(spec) => {
                crate::validate::name("jobDefinitionName", &spec.name)
            }
            Command::SubmitJob(sub) => self.check_submit(sub).map(|_| ()),
            // Each submit of a batch is accepted or refused on its own when applied.
            Command::SubmitJobs(_) => Ok(()),
            // As AWS: terminating a job that does not exist (or was purged) is no error.
            Command::TerminateJob { .. } => Ok(()),
            Command::RegisterNode {
                node,
                compute_environment,
                ..
            } => {
                let Some(ce) = self.compute_environment(compute_environment) else {
                    return Err(Rejection::new(
                        "computeEnvironment",
                        format!(
                            "computeEnvironment: compute environment {compute_environment} does not exist"
                        ),
                    ));
                };
                if ce.ce_type != CeType::Unmanaged {
                    return Err(Rejection::new(
                        "computeEnvironment",
                        format!(
                            "computeEnvironment: agents may only join UNMANAGED compute environments; {} is MANAGED",
                            ce.name
                        ),
                    ));
                }
                if let Some(existing) = self.nodes.get(node)
                    && existing.compute_environment != ce.name
                    && !existing.placed_jobs.is_empty()
                {
                    return Err(Rejection::new(
                        "computeEnvironment",
                        format!(
                            "computeEnvironment: node {node} still runs jobs for {} and cannot move to {}",
                            existing.compute_environment, ce.name
                        ),
                    ));
                }
                Ok(())
            }
            Command::Place { .. }
            | Command::ReportAttempt { .. }
            | Command::ReportAttempts { .. } => Ok(()),
            Command::Iam(iam) => self.check_iam(iam),
            Command::PurgeJobs { .. }
            | Command::NodeLost { .. }
            | Command::SetWaitReasons { .. }
            | Command::FailUnplaceable { .. }
            | Command::NodeHealth { .. } => Ok(()),
            Command::Admin(admin) => self.check_admin(admin),
        }
    }

    /// Resolves a submission against the state: its queue name and definition.
    fn check_submit(&self, sub: &JobSubmission) -> Result<(&JobQueue, &JobDefinition), Rejection> {
        crate::validate::name("jobName", &sub.name)?;
        let queue = self.queue(&sub.queue).ok_or_else(|| {
            Rejection::new(
                "jobQueue",
                format!("jobQueue: job queue {} does not exist", sub.queue),
            )
        })?;
        if queue.state != EnabledState::Enabled {
            return Err(Rejection::new(
                "jobQueue",
                format!(
                    "jobQueue: job queue {} is DISABLED and does not accept jobs",
                    queue.name
                ),
            ));
        }
        // A fair-share queue orders its jobs by share: each must name one, and a FIFO queue
        // has no shares to name.
        let share = sub.extra.get("shareIdentifier").and_then(|v| v.as_str());
        match (queue.scheduling_policy_arn.is_some(), share) {
            (true, None) => {
                return Err(Rejection::new(
                    "shareIdentifier",
                    "shareIdentifier is required on a queue with a fair-share scheduling policy",
                ));
            }
            (false, Some(_)) => {
                return Err(Rejection::new(
                    "shareIdentifier",
                    "shareIdentifier: only queues with a fair-share scheduling policy take one",
                ));
            }
            _ => {}
        }
        let definition = self.definition(&sub.definition).ok_or_else(|| {
            Rejection::new(
                "jobDefinition",
                format!(
                    "jobDefinition: job definition {} does not exist",
                    sub.definition
                ),
            )
        })?;
        if definition.status != DefinitionStatus::Active {
            return Err(Rejection::new(
                "jobDefinition",
                format!(
                    "jobDefinition: job definition {} is INACTIVE",
                    definition.arn
                ),
            ));
        }
        if definition.extra.get("type").and_then(|t| t.as_str()) == Some("multinode") {
            return Err(Rejection::new(
                "jobDefinition",
                "jobDefinition: multi-node parallel jobs cannot run on Muster yet (gang scheduling is still to come)",
            ));
        }
        if definition.orchestration != crate::Orchestration::Container {
            return Err(Rejection::new(
                "jobDefinition",
                format!(
                    "jobDefinition: {} describes its jobs with {}; Muster runs container jobs (containerProperties) only",
                    definition.arn,
                    definition.orchestration.member()
                ),
            ));
        }
        self.check_dependencies(sub)?;
        let resources = definition
            .container
            .with_overrides(&sub.overrides)
            .resources();
        if resources.millicpus == 0 {
            return Err(Rejection::new(
                "containerOverrides.resourceRequirements",
                "containerOverrides.resourceRequirements: the job must request at least one vCPU (VCPU)",
            ));
        }
        if resources.memory_mib < 4 {
            return Err(Rejection::new(
                "containerOverrides.resourceRequirements",
                "containerOverrides.resourceRequirements: the job must request at least 4 MiB of MEMORY",
            ));
        }
        Ok((queue, definition))
    }

    /// Applies one committed command. Deterministic and total: the same state and command
    /// give the same result on every node, and nothing panics.
    pub fn apply(&mut self, cmd: Command) -> Outcome {
        if let Err(rejection) = self.check(&cmd) {
            return Outcome::Rejected(rejection);
        }
        if Self::may_enable_placements(&cmd) {
            self.placement_epoch += 1;
        }
        match cmd {
            Command::CreateComputeEnvironment(mut ce) => {
                ce.arn = self.scope.arn("compute-environment", &ce.name);
                self.compute_environments.insert(ce.name.clone(), ce);
                Outcome::Done
            }
            Command::CreateJobQueue(mut q) => {
                q.arn = self.scope.arn("job-queue", &q.name);
                q.compute_environment_order =
                    self.resolve_ce_order(std::mem::take(&mut q.compute_environment_order));
                self.queues.insert(q.name.clone(), q);
                Outcome::Done
            }
            Command::RegisterJobDefinition(spec) => self.register_definition(spec),
            Command::SubmitJob(sub) => self.submit(sub),
            Command::SubmitJobs(subs) => {
                Outcome::Each(subs.into_iter().map(|sub| self.submit(sub)).collect())
            }
            Command::TerminateJob { job, reason, at } => self.terminate(&job, reason, at),
            Command::RegisterNode {
                node,
                compute_environment,
                inventory,
                at,
            } => self.register_node(node, &compute_environment, inventory, at),
            Command::Place {
                term,
                at,
                placements,
            } => self.place(term, at, placements),
            Command::ReportAttempt {
                job,
                attempt,
                node,
                event,
                at,
            } => self.report(&job, attempt, &node, event, at),
            Command::ReportAttempts { reports, at } => {
                for r in reports {
                    self.report(&r.job, r.attempt, &r.node, r.event, at);
                }
                Outcome::Done
            }
            Command::Iam(iam) => self.apply_iam(iam),
            Command::PurgeJobs { before } => self.purge(before),
            Command::NodeLost { node, at } => self.node_lost(&node, at),
            Command::NodeHealth {
                node,
                unhealthy,
                at: _,
            } => {
                let Some(n) = self
                    .nodes
                    .get_mut(&node)
                    .filter(|n| n.status != NodeStatus::Lost)
                else {
                    return Outcome::Ignored(format!("node {node} is not registered"));
                };
                n.status = if unhealthy.is_some() {
                    NodeStatus::Unhealthy
                } else {
                    NodeStatus::Ready
                };
                n.unhealthy_reason = unhealthy;
                Outcome::Done
            }
            Command::FailUnplaceable { jobs, at } => {
                for (id, reason) in jobs {
                    if self
                        .jobs
                        .get(&id)
                        .is_some_and(|j| j.status == JobStatus::Runnable)
                    {
                        self.end_job(&id, reason, at, Ending::Cancel);
                    }
                }
                Outcome::Done
            }
            Command::SetWaitReasons { reasons } => {
                for (id, reason) in reasons {
                    if let Some(job) = self
                        .jobs
                        .get_mut(&id)
                        .filter(|j| j.status == JobStatus::Runnable)
                    {
                        job.status_reason = Some(reason);
                    }
                }
                Outcome::Done
            }
            Command::Admin(admin) => self.apply_admin(admin),
        }
    }

    fn register_definition(&mut self, spec: JobDefinitionSpec) -> Outcome {
        let revisions = self.definitions.entry(spec.name.clone()).or_default();
        let revision = revisions.len() as u32 + 1;
        let arn = self
            .scope
            .arn("job-definition", &format!("{}:{}", spec.name, revision));
        revisions.push(JobDefinition {
            name: spec.name.clone(),
            revision,
            arn: arn.clone(),
            status: DefinitionStatus::Active,
            container: spec.container,
            parameters: spec.parameters,
            tags: spec.tags,
            retry: spec.retry,
            timeout_secs: spec.timeout_secs,
            extra: spec.extra,
            orchestration: spec.orchestration,
        });
        Outcome::DefinitionRegistered {
            name: spec.name,
            revision,
            arn: arn.0,
        }
    }

    fn terminate(&mut self, id: &JobId, reason: String, at: Timestamp) -> Outcome {
        self.end_job(id, reason, at, Ending::Terminate)
    }

    /// Ends a job that has not ended: one not yet placed fails at once; a placed one is
    /// stopped by its agent (terminate) or left alone (cancel), as AWS Batch does.
    pub(super) fn end_job(
        &mut self,
        id: &JobId,
        reason: String,
        at: Timestamp,
        how: Ending,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(id) else {
            return Outcome::Ignored(format!("job {id} does not exist"));
        };
        match job.status {
            s if s.is_terminal() => {
                Outcome::Ignored(format!("job {id} already ended {}", s.as_aws()))
            }
            s if s.is_placed() && how == Ending::Cancel => Outcome::Ignored(format!(
                "job {id} is already {}; CancelJob does not stop it",
                s.as_aws()
            )),
            s if s.is_placed() => {
                // The agent stops the container; the attempt's exit report ends the job.
                job.is_terminated = true;
                job.terminate_reason.get_or_insert(reason);
                Outcome::Done
            }
            s => {
                if s == JobStatus::Runnable {
                    self.runnable.remove(job);
                }
                job.status = JobStatus::Failed;
                job.status_reason = Some(reason.clone());
                job.is_terminated = how == Ending::Terminate;
                job.is_cancelled = how == Ending::Cancel;
                job.stopped_at = Some(at);
                let children = match job.array {
                    Some(crate::ArrayRole::Parent { size, .. }) => size,
                    _ => 0,
                };
                // Ending an array parent ends its children the same way.
                for index in 0..children {
                    let child = JobId::from(format!("{id}:{index}"));
                    self.end_job(&child, reason.clone(), at, how);
                }
                self.settle(id, at);
                Outcome::Done
            }
        }
    }

    fn register_node(
        &mut self,
        id: NodeId,
        ce: &str,
        inventory: NodeInventory,
        at: Timestamp,
    ) -> Outcome {
        let ce_name = match self.compute_environment(ce) {
            Some(ce) => ce.name.clone(),
            None => {
                return Outcome::Rejected(Rejection::new(
                    "computeEnvironment",
                    "unknown compute environment",
                ));
            }
        };
        let node = self.nodes.entry(id.clone()).or_insert_with(|| Node {
            id,
            compute_environment: ce_name.clone(),
            inventory: inventory.clone(),
            status: NodeStatus::Ready,
            allocated: Resources::ZERO,
            allocated_unbounded: Resources::ZERO,
            placed_jobs: BTreeSet::new(),
            gpus_in_use: BTreeSet::new(),
            registered_at: at,
            unhealthy_reason: None,
        });
        node.compute_environment = ce_name;
        node.inventory = inventory;
        node.status = NodeStatus::Ready;
        node.unhealthy_reason = None;
        node.registered_at = at;
        Outcome::Done
    }

    fn node_lost(&mut self, id: &NodeId, at: Timestamp) -> Outcome {
        let Some(node) = self
            .nodes
            .get_mut(id)
            .filter(|n| n.status != NodeStatus::Lost)
        else {
            return Outcome::Ignored(format!("node {id} is already lost"));
        };
        node.status = NodeStatus::Lost;
        let placed: Vec<JobId> = node.placed_jobs.iter().cloned().collect();
        for job in placed {
            let Some(attempt) = self
                .jobs
                .get(&job)
                .and_then(|j| j.active.as_ref())
                .map(|a| a.number)
            else {
                continue;
            };
            let event = AttemptEvent::Exited {
                exit_code: None,
                reason: Some(format!("Host {id} terminated.")),
            };
            self.report(&job, attempt, id, event, at);
        }
        Outcome::Done
    }

    /// The worker nodes whose assignments `cmd` may change when applied to this state, so
    /// that only their agents' streams need a fresh look.
    pub fn nodes_affected_by(&self, cmd: &Command) -> AffectedNodes {
        let node_of = |job: &JobId| {
            self.jobs
                .get(job)
                .and_then(|j| j.active.as_ref())
                .map(|a| a.node.clone())
        };
        match cmd {
            Command::Place { placements, .. } => {
                AffectedNodes::Some(placements.iter().map(|p| p.node.clone()).collect())
            }
            // An attempt reported RUNNING stays assigned; one that exited is no longer.
            Command::ReportAttempt {
                event: AttemptEvent::Running,
                ..
            } => AffectedNodes::Some(Vec::new()),
            Command::ReportAttempt { node, .. }
            | Command::NodeLost { node, .. }
            | Command::NodeHealth { node, .. }
            | Command::RegisterNode { node, .. } => AffectedNodes::Some(vec![node.clone()]),
            Command::ReportAttempts { reports, .. } => AffectedNodes::Some(
                reports
                    .iter()
                    .filter(|r| !matches!(r.event, AttemptEvent::Running))
                    .map(|r| r.node.clone())
                    .collect(),
            ),
            Command::TerminateJob { job, .. } => {
                AffectedNodes::Some(node_of(job).into_iter().collect())
            }
            Command::SubmitJob(_)
            | Command::SubmitJobs(_)
            | Command::SetWaitReasons { .. }
            | Command::FailUnplaceable { .. }
            | Command::PurgeJobs { .. }
            | Command::Iam(_)
            | Command::CreateComputeEnvironment(_)
            | Command::CreateJobQueue(_)
            | Command::RegisterJobDefinition(_) => AffectedNodes::Some(Vec::new()),
            // Rare, and some end placed jobs wholesale (a deleted queue terminates its jobs).
            Command::Admin(_) => AffectedNodes::All,
        }
    }

    /// Why `placement` cannot be applied to this state, if it cannot.
    pub fn placement_conflict(&self, placement: &Placement) -> Option<String> {
        let Some(job) = self.jobs.get(&placement.job) else {
            return Some("job does not exist".into());
        };
        if job.status != JobStatus::Runnable {
            return Some(format!("job is {}", job.status.as_aws()));
        }
        let Some(node) = self.nodes.get(&placement.node) else {
            return Some("node does not exist".into());
        };
        if node.status != NodeStatus::Ready {
            return Some("node is not ready".into());
        }
        let queue = self.queues.get(&job.spec.queue)?;
        if !queue
            .compute_environment_order
            .iter()
            .any(|e| e.compute_environment == node.compute_environment)
        {
            return Some("node is outside the queue's compute environments".into());
        }
        let ce_enabled = self
            .compute_environments
            .get(&node.compute_environment)
            .is_some_and(|ce| ce.state == EnabledState::Enabled);
        if !ce_enabled {
            return Some("compute environment is disabled".into());
        }
        if !job.spec.container.resources().fits_in(&node.free()) {
            return Some("node lacks free capacity".into());
        }
        let wanted = job.spec.container.resources().gpus as usize;
        let distinct: BTreeSet<u32> = placement.gpus.iter().copied().collect();
        if placement.gpus.len() != wanted || distinct.len() != wanted {
            return Some(format!(
                "placement names {} GPUs for a job that needs {wanted}",
                placement.gpus.len()
            ));
        }
        if !node.satisfies(job) {
            return Some("node lacks a label or GPU model the job requires".into());
        }
        let free: BTreeSet<u32> = node.free_gpus_for(job).collect();
        if !distinct.is_subset(&free) {
            return Some(
                "a named GPU is not free on the node, or not of the required model".into(),
            );
        }
        None
    }

    fn place(&mut self, term: u64, at: Timestamp, placements: Vec<Placement>) -> Outcome {
        let (mut placed, mut refused) = (0, 0);
        for p in placements {
            if self.placement_conflict(&p).is_some() {
                refused += 1;
                continue;
            }
            let (Some(job), Some(node)) = (self.jobs.get_mut(&p.job), self.nodes.get_mut(&p.node))
            else {
                refused += 1;
                continue;
            };
            self.runnable.remove(job);
            job.status = JobStatus::Starting;
            job.status_reason = None;
            job.active = Some(Box::new(ActiveAttempt {
                number: job.attempts.len() as u32 + 1,
                node: node.id.clone(),
                term,
                placed_at: at,
                started_at: None,
                gpus: p.gpus.clone(),
            }));
            node.gpus_in_use.extend(p.gpus.iter().copied());
            node.allocated = node.allocated + job.spec.container.resources();
            if job.spec.timeout_secs.is_none() {
                node.allocated_unbounded =
                    node.allocated_unbounded + job.spec.container.resources();
            }
            track_share(&mut self.share_running, job, true);
            node.placed_jobs.insert(job.id.clone());
            placed += 1;
        }
        Outcome::Placed { placed, refused }
    }

    fn report(
        &mut self,
        id: &JobId,
        attempt: u32,
        node: &NodeId,
        event: AttemptEvent,
        at: Timestamp,
    ) -> Outcome {
        let Some(job) = self.jobs.get_mut(id) else {
            return Outcome::Ignored(format!("job {id} does not exist"));
        };
        let current = job
            .active
            .as_ref()
            .is_some_and(|a| a.number == attempt && &a.node == node);
        if !current {
            return Outcome::Ignored(format!(
                "attempt {attempt} of job {id} on {node} is not the active one"
            ));
        }
        match event {
            AttemptEvent::Running => {
                if job.status != JobStatus::Starting {
                    return Outcome::Ignored(format!(
                        "job {id} is already {}",
                        job.status.as_aws()
                    ));
                }
                job.status = JobStatus::Running;
                job.started_at = Some(at);
                if let Some(a) = job.active.as_mut() {
                    a.started_at = Some(at);
                }
                Outcome::Done
            }
            AttemptEvent::Exited { exit_code, reason } => {
                let Some(active) = job.active.take() else {
                    return Outcome::Ignored("no active attempt".into());
                };
                track_share(&mut self.share_running, job, false);
                if let Some(share) = &job.spec.share_identifier {
                    let half_life = self
                        .queues
                        .get(&job.spec.queue)
                        .and_then(|q| q.scheduling_policy_arn.as_deref())
                        .and_then(|arn| self.scheduling_policies.values().find(|p| p.arn.0 == arn))
                        .map_or(0, |p| p.fairshare_policy().share_decay_seconds);
                    if half_life > 0 {
                        let ran_ms = at.as_millis().saturating_sub(active.placed_at.as_millis());
                        let used = job.spec.container.resources().millicpus * ran_ms / 1000;
                        let usage = self
                            .share_usage
                            .entry(job.spec.queue.clone())
                            .or_default()
                            .entry(share.clone())
                            .or_default();
                        *usage = usage.add(used, at, half_life);
                    }
                }
                if let Some(n) = self.nodes.get_mut(&active.node) {
                    n.allocated = n.allocated - job.spec.container.resources();
                    if job.spec.timeout_secs.is_none() {
                        n.allocated_unbounded =
                            n.allocated_unbounded - job.spec.container.resources();
                    }
                    n.placed_jobs.remove(id);
                    for gpu in &active.gpus {
                        n.gpus_in_use.remove(gpu);
                    }
                }
                let status_reason = match (&job.terminate_reason, exit_code, &reason) {
                    (Some(terminated), _, _) => terminated.clone(),
                    (None, _, Some(why)) if why == ATTEMPT_TIMED_OUT => why.clone(),
                    (None, Some(_), _) => CONTAINER_EXITED.to_owned(),
                    (None, None, Some(why)) => why.clone(),
                    (None, None, None) => "Attempt ended without an exit code".to_owned(),
                };
                let retry = exit_code != Some(0)
                    && job.terminate_reason.is_none()
                    && job.spec.retry.retries(
                        active.number,
                        exit_code,
                        reason.as_deref(),
                        &status_reason,
                    );
                // An exit code means the container ran, also when the RUNNING report was
                // lost on the way (an agent sends it again with the exit, which is then late).
                let started_at = active.started_at.or(exit_code.map(|_| at));
                if job.started_at.is_none() {
                    job.started_at = started_at;
                }
                // Most jobs end after one attempt: a first push would reserve room for four
                // records (512 bytes), kept for the job's whole retention on every replica.
                job.attempts.reserve_exact(1);
                job.attempts.push(AttemptRecord {
                    node: active.node,
                    started_at,
                    stopped_at: at,
                    exit_code,
                    reason,
                    status_reason: status_reason.clone(),
                    log_stream_name: job.log_stream_name(active.number),
                });
                job.status_reason = Some(status_reason);
                if retry {
                    // Back in line, at its original place in submit order.
                    job.status = JobStatus::Runnable;
                    job.runnable_since = Some(at);
                    self.runnable.insert(job);
                    return Outcome::Done;
                }
                let succeeded = exit_code == Some(0) && job.terminate_reason.is_none();
                job.status = if succeeded {
                    JobStatus::Succeeded
                } else {
                    JobStatus::Failed
                };
                job.stopped_at = Some(at);
                self.settle(id, at);
                Outcome::Done
            }
        }
    }
}

/// Replaces every `Ref::name` in each argument of a command with the parameter's value (AWS's
/// parameter substitution), also inside a longer argument (`"test Ref::msg = hello"`); where
/// names share a prefix the longest that matches wins. Unknown references are left as written.
pub(crate) fn substitute_parameters(
    command: &[String],
    parameters: &BTreeMap<String, String>,
) -> Vec<String> {
    command
        .iter()
        .map(|arg| substitute_in(arg, parameters))
        .collect()
}

fn substitute_in(arg: &str, parameters: &BTreeMap<String, String>) -> String {
    const MARK: &str = "Ref::";
    if parameters.is_empty() || !arg.contains(MARK) {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let longest = parameters
            .iter()
            .filter(|(name, _)| !name.is_empty() && after.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len());
        match longest {
            Some((name, value)) => {
                out.push_str(value);
                rest = &after[name.len()..];
            }
            None => {
                out.push_str(MARK);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Adds (`placed`) or removes a placed job's vCPUs to its share identifier's running total.
fn track_share(running: &mut BTreeMap<String, BTreeMap<String, u64>>, job: &Job, placed: bool) {
    let Some(share) = &job.spec.share_identifier else {
        return;
    };
    let millicpus = job.spec.container.resources().millicpus;
    let shares = running.entry(job.spec.queue.clone()).or_default();
    let total = shares.entry(share.clone()).or_default();
    if placed {
        *total += millicpus;
    } else {
        *total = total.saturating_sub(millicpus);
        if *total == 0 {
            shares.remove(share);
        }
    }
}
