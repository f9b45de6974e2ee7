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

mod access;
pub(crate) mod archive;
pub(crate) mod assignments;
mod attempts;
mod checks;
mod gang;
mod iam;
mod invariants;
mod job_table;
mod lifecycle;
mod resources;
mod runnable;

pub use archive::{
    ArchiveChanges, ArchivedStream, EndedEntry, JobArchive, listed_in_order, merge_by_seq,
    stream_listed,
};
use attempts::track_share;
pub use gang::MAIN_NODE_EXITED;

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
    /// Join tokens by id.
    #[serde(default)]
    join_tokens: BTreeMap<String, crate::JoinToken>,
    /// Agents cut off, and when (until reinstated).
    #[serde(default)]
    revoked_agents: BTreeMap<NodeId, crate::Timestamp>,
    /// Agents reinstated after a revocation, and when each was revoked: certificates issued
    /// for the name before then stay refused.
    #[serde(default)]
    reinstated_agents: BTreeMap<NodeId, crate::Timestamp>,
    /// How many join tokens were ever made (retention forgets the tokens, not this count).
    #[serde(default)]
    join_tokens_made: u64,

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
    /// True only while one apply stops a gang's nodes (see `stop_gang`).
    #[serde(skip)]
    stopping_gang: bool,
    /// Ended jobs that left memory (see `archive.rs`).
    #[serde(default)]
    ended: archive::EndedIndex,
    /// Where those jobs went, and what moved since the state machine last wrote there.
    #[serde(skip)]
    archive: archive::ArchiveLink,
    /// Ended job families still in memory, by root, oldest end first: what `ArchiveEnded`
    /// moves out. Derived from `jobs`.
    #[serde(skip)]
    ended_in_memory: BTreeSet<(crate::Timestamp, JobId)>,
    /// The command level `SetClusterLevel` raised the cluster to; 0 (a state that records
    /// none) reads as level 1.
    #[serde(default)]
    cluster_level: u32,
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
        self.ended_in_memory.clear();
        for node in self.nodes.values_mut() {
            node.allocated_unbounded = Resources::ZERO;
            node.gang_nodes = 0;
        }
        for job in self.jobs.values() {
            let key = (job.seq, job.id.clone());
            self.jobs_by_queue
                .entry(job.spec.queue.clone())
                .or_default()
                .insert(key.clone());
            // A multi-node job waits as its parent; its nodes are never in line themselves.
            if job.status == JobStatus::Runnable && job.gang_node().is_none() {
                self.runnable.insert(job);
            }
            if let Some(active) = &job.active {
                track_share(&mut self.share_running, job, true);
                if let Some(node) = self.nodes.get_mut(&active.node) {
                    if job.spec.timeout_secs.is_none() {
                        node.allocated_unbounded =
                            node.allocated_unbounded + job.spec.container.resources();
                    }
                    if job.gang_node().is_some() {
                        node.gang_nodes += 1;
                    }
                }
            }
            if let Some(key) = archive::ended_root_key(job) {
                self.ended_in_memory.insert(key);
            }
            // A job that ended (cancelled while it waited) waits on nothing any more: counted
            // here, it would keep its dependency in memory on a replica loaded from a snapshot
            // and nowhere else, and the replicas would archive and purge different jobs.
            let still_waiting = !job.status.is_terminal();
            for dep in job.waiting_on.iter().filter(|_| still_waiting) {
                self.dependents
                    .entry(dep.clone())
                    .or_default()
                    .insert(job.id.clone());
            }
        }
    }

    /// The cluster's command level (see [`crate::COMMAND_LEVEL`]): what may be proposed now.
    pub fn cluster_level(&self) -> u32 {
        self.cluster_level.max(1)
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

    /// The CloudWatch log group a job's output is served in: its definition's
    /// `awslogs-group` where its `logConfiguration` uses the `awslogs` driver with one, else
    /// [`DEFAULT_LOG_GROUP`](crate::DEFAULT_LOG_GROUP).
    pub fn log_group_of<'a>(&'a self, job: &Job) -> &'a str {
        self.definition(&job.spec.definition_arn.0)
            .and_then(JobDefinition::awslogs_group)
            .unwrap_or(crate::DEFAULT_LOG_GROUP)
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

    /// Applies one committed command. Deterministic and total: the same state and command
    /// give the same result on every node, and nothing panics.
    pub fn apply(&mut self, cmd: Command) -> Outcome {
        if let Err(rejection) = self.check(&cmd) {
            return Outcome::Rejected(rejection);
        }
        if Self::may_enable_placements(&cmd) {
            self.placement_epoch += 1;
        }
        self.apply_checked(cmd)
    }

    fn apply_checked(&mut self, cmd: Command) -> Outcome {
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
            Command::Access(access) => self.apply_access(access),
            Command::PurgeJobs { before } => self.purge(before),
            Command::ArchiveEnded { before, max_jobs } => self.archive_ended(before, max_jobs),
            Command::SetClusterLevel { level } => {
                self.cluster_level = self.cluster_level.max(level);
                Outcome::Done
            }
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
            options: spec.options,
            scheduling_priority: spec.scheduling_priority,
            node_properties: spec.node_properties,
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
            return Outcome::Ignored(match self.ended.get(id) {
                Some(ended) => format!("job {id} already ended {}", ended.status().as_aws()),
                None => format!("job {id} does not exist"),
            });
        };
        // A node of a multi-node job is ended with its whole job.
        if let Some((parent, _, _)) = job.gang_node() {
            return self.end_job(&parent, reason, at, how);
        }
        let gang = job.gang_size().is_some();
        match job.status {
            s if s.is_terminal() => {
                Outcome::Ignored(format!("job {id} already ended {}", s.as_aws()))
            }
            s if s.is_placed() && how == Ending::Cancel => Outcome::Ignored(format!(
                "job {id} is already {}; CancelJob does not stop it",
                s.as_aws()
            )),
            s if s.is_placed() && gang => {
                self.terminate_gang(id, reason, at);
                Outcome::Done
            }
            s if s.is_placed() => {
                job.is_terminated = true;
                job.terminate_reason.get_or_insert(reason.clone());
                // A RUNNING attempt ends when its agent, no longer assigned it, stops the
                // container and reports the exit. A STARTING one ends now: its agent may never
                // have received it (it leaves the node's assignments here), and then no report
                // would ever come. Should it be running after all, the agent stops it, and its
                // late report is ignored.
                let starting = job
                    .active
                    .as_ref()
                    .filter(|a| a.started_at.is_none())
                    .map(|a| (a.number, a.node.clone()));
                if let Some((attempt, node)) = starting {
                    let event = AttemptEvent::Exited {
                        exit_code: None,
                        reason: Some(reason),
                    };
                    self.report(id, attempt, &node, event, at);
                }
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
                if gang {
                    self.mirror_gang(id);
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
            draining: false,
            gang_nodes: 0,
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
        // What reports change: an exit takes its attempt off its node, and a node of a
        // multi-node job that exits may stop its gang; a main node that runs releases the
        // others. Each gang's workers are listed once however many of its nodes report.
        let reports_affect =
            |reports: &mut dyn Iterator<Item = (&JobId, &NodeId, &AttemptEvent)>| {
                let mut nodes = Vec::new();
                let mut gangs = BTreeSet::new();
                for (job, node, event) in reports {
                    let gang = self.jobs.get(job).and_then(|j| j.gang_node());
                    match (event, gang) {
                        (AttemptEvent::Running, Some((parent, _, true))) => {
                            gangs.insert(parent);
                        }
                        (AttemptEvent::Running, _) => {}
                        (AttemptEvent::Exited { .. }, gang) => {
                            nodes.push(node.clone());
                            gangs.extend(gang.map(|(parent, _, _)| parent));
                        }
                    }
                }
                for parent in gangs {
                    nodes.extend(self.gang_workers(&parent));
                }
                nodes
            };
        match cmd {
            Command::Place { placements, .. } => {
                AffectedNodes::Some(placements.iter().map(|p| p.node.clone()).collect())
            }
            Command::ReportAttempt {
                job, node, event, ..
            } => AffectedNodes::Some(reports_affect(&mut std::iter::once((job, node, event)))),
            Command::ReportAttempts { reports, .. } => AffectedNodes::Some(reports_affect(
                &mut reports.iter().map(|r| (&r.job, &r.node, &r.event)),
            )),
            Command::NodeLost { node, .. } => {
                let mut nodes = vec![node.clone()];
                if let Some(n) = self.nodes.get(node) {
                    for job in &n.placed_jobs {
                        nodes.extend(self.gang_workers(job));
                    }
                }
                AffectedNodes::Some(nodes)
            }
            Command::NodeHealth { node, .. } | Command::RegisterNode { node, .. } => {
                AffectedNodes::Some(vec![node.clone()])
            }
            Command::TerminateJob { job, .. } => {
                let mut nodes: Vec<NodeId> = node_of(job).into_iter().collect();
                nodes.extend(self.gang_workers(job));
                AffectedNodes::Some(nodes)
            }
            Command::SubmitJob(_)
            | Command::SubmitJobs(_)
            | Command::SetWaitReasons { .. }
            | Command::FailUnplaceable { .. }
            | Command::PurgeJobs { .. }
            | Command::ArchiveEnded { .. }
            | Command::SetClusterLevel { .. }
            | Command::Iam(_)
            | Command::Access(crate::AccessCommand::CreateJoinToken(_))
            | Command::Access(crate::AccessCommand::RevokeJoinToken { .. })
            | Command::CreateComputeEnvironment(_)
            | Command::CreateJobQueue(_)
            | Command::RegisterJobDefinition(_) => AffectedNodes::Some(Vec::new()),
            // Rare, and some end placed jobs wholesale (a deleted queue terminates its jobs).
            Command::Admin(_) => AffectedNodes::All,
            // Its stream is ended by the gateway, which refuses it from now on.
            Command::Access(
                crate::AccessCommand::RevokeAgent { node, .. }
                | crate::AccessCommand::ReinstateAgent { node, .. },
            ) => AffectedNodes::Some(vec![node.clone()]),
        }
    }
}
