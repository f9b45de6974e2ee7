//! Submitting jobs (single, array, with dependencies) and what follows when a job ends:
//! dependents released or failed, array parents completed.

use super::State;
use crate::{
    ArrayRole, DependencyKind, Job, JobId, JobSpec, JobStatus, JobSubmission, Outcome, Rejection,
    Timestamp,
};
use std::collections::BTreeSet;

pub const MAX_ARRAY_SIZE: u32 = 10_000;

/// The tag whose value makes SubmitJob idempotent (beyond AWS, which has no such key).
pub const CLIENT_TOKEN_TAG: &str = "muster:client-token";

impl State {
    /// Checks `dependsOn` against the jobs that exist: known ids, N_TO_N between arrays of one
    /// size, SEQUENTIAL only on arrays.
    pub(super) fn check_dependencies(&self, sub: &JobSubmission) -> Result<(), Rejection> {
        if let Some(size) = sub.array_size
            && !(2..=MAX_ARRAY_SIZE).contains(&size)
        {
            return Err(Rejection::new(
                "arrayProperties.size",
                format!("arrayProperties.size: {size} must be between 2 and {MAX_ARRAY_SIZE}"),
            ));
        }
        for dep in &sub.depends_on {
            match (dep.kind, &dep.job) {
                (DependencyKind::Sequential, _) if sub.array_size.is_none() => {
                    return Err(Rejection::new(
                        "dependsOn",
                        "dependsOn: SEQUENTIAL applies only to array jobs",
                    ));
                }
                (DependencyKind::Sequential, _) => {}
                (_, None) => {
                    return Err(Rejection::new(
                        "dependsOn.jobId",
                        "dependsOn.jobId is required",
                    ));
                }
                (kind, Some(id)) => {
                    let (gang_parent, array_size) = match (self.jobs.get(id), self.ended_job(id)) {
                        (Some(target), _) => (
                            target.gang_node().map(|(parent, _, _)| parent),
                            match target.array {
                                Some(ArrayRole::Parent { size, .. }) => Some(size),
                                _ => None,
                            },
                        ),
                        (None, Some(ended)) => (
                            ended
                                .gang_node
                                .then(|| id.as_str().rsplit_once('#'))
                                .flatten()
                                .map(|(parent, _)| JobId::from(parent)),
                            (ended.array_size > 0).then_some(ended.array_size),
                        ),
                        (None, None) => {
                            return Err(Rejection::new(
                                "dependsOn.jobId",
                                format!("dependsOn.jobId: job {id} does not exist"),
                            ));
                        }
                    };
                    if let Some(parent) = gang_parent {
                        return Err(Rejection::new(
                            "dependsOn.jobId",
                            format!(
                                "dependsOn.jobId: {id} is a node of the multi-node job {parent}; depend on {parent}"
                            ),
                        ));
                    }
                    if kind == DependencyKind::NToN
                        && (sub.array_size.is_none() || array_size != sub.array_size)
                    {
                        return Err(Rejection::new(
                            "dependsOn.type",
                            format!(
                                "dependsOn.type: N_TO_N needs two array jobs of the same size; {id} is not"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn submit(&mut self, mut sub: JobSubmission) -> Outcome {
        // A submit retried with the same id (a forward that timed out after commit) answers
        // with the job it already created.
        let token = sub
            .tags
            .get(CLIENT_TOKEN_TAG)
            .map(|t| format!("{}/{t}", sub.queue));
        let first = token
            .as_ref()
            .and_then(|t| self.client_tokens.get(t))
            .cloned()
            .unwrap_or_else(|| sub.id.clone());
        if let Some(existing) = self.jobs.get(&first) {
            return Outcome::JobSubmitted {
                id: existing.id.clone(),
                arn: existing.arn(&self.scope).0,
                name: existing.spec.name.clone(),
            };
        }
        // The same, for a job that has already ended and left memory: the retry names it.
        if self.ended.contains(&first) {
            return Outcome::JobSubmitted {
                arn: self.scope.arn("job", first.as_str()).0,
                id: first,
                name: sub.name,
            };
        }
        let (queue, definition) = match self.check_submit(&sub) {
            Ok(found) => found,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        let node_properties = match Self::node_properties_of(definition, &sub) {
            Ok(nodes) => nodes.map(std::sync::Arc::new),
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        // A multi-node job's parent describes the main node's container.
        let container = match &node_properties {
            Some(nodes) => nodes
                .range_of(nodes.main_node)
                .map(|r| r.container.clone())
                .unwrap_or_default(),
            None => definition.container.with_overrides(&sub.overrides),
        };
        // Moved out of the submission rather than copied: this runs on every replica for
        // every job submitted.
        let mut parameters = definition.parameters.clone();
        parameters.extend(std::mem::take(&mut sub.parameters));
        let mut tags = std::mem::take(&mut sub.tags);
        for (k, v) in &definition.tags {
            tags.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let options = match &node_properties {
            Some(nodes) => nodes
                .range_of(nodes.main_node)
                .map(|r| r.options.clone())
                .unwrap_or_default(),
            None => definition.options.clone(),
        };
        let fabric = crate::Fabric::required(&tags, &options);
        let spec = std::sync::Arc::new(JobSpec {
            fabric,
            name: sub.name.clone(),
            queue: queue.name.clone(),
            definition_arn: definition.arn.clone(),
            container,
            parameters,
            tags,
            retry: sub
                .retry
                .take()
                .or_else(|| definition.retry.clone())
                .unwrap_or_default(),
            timeout_secs: sub.timeout_secs.or(definition.timeout_secs),
            depends_on: sub.depends_on.clone(),
            share_identifier: sub.share_identifier.clone(),
            scheduling_priority: sub
                .scheduling_priority_override
                .or(definition.scheduling_priority)
                .unwrap_or(0),
            extra: std::mem::take(&mut sub.extra),
            node_properties: node_properties.clone(),
        });
        let template = Job {
            seq: 0,
            id: sub.id.clone(),
            spec,
            status: JobStatus::Submitted,
            status_reason: None,
            created_at: sub.at,
            started_at: None,
            stopped_at: None,
            active: None,
            attempts: Vec::new(),
            terminate_reason: None,
            is_terminated: false,
            is_cancelled: false,
            waiting_on: BTreeSet::new(),
            array: None,
            runnable_since: None,
            multinode: node_properties.as_ref().map(|nodes| {
                Box::new(crate::MultiNodeRole::Parent {
                    num_nodes: nodes.num_nodes,
                    main_node: nodes.main_node,
                    ending: None,
                })
            }),
        };
        if let Some(t) = token {
            self.client_tokens.insert(t, sub.id.clone());
        }
        let outcome = Outcome::JobSubmitted {
            id: sub.id.clone(),
            arn: template.arn(&self.scope).0,
            name: sub.name.clone(),
        };
        let plain: BTreeSet<JobId> = sub
            .depends_on
            .iter()
            .filter(|d| d.kind == DependencyKind::Plain)
            .filter_map(|d| d.job.clone())
            .collect();
        match sub.array_size {
            None => {
                let mut job = template;
                job.waiting_on = plain;
                self.admit(job, sub.at);
                if let Some(nodes) = &node_properties {
                    self.add_gang_nodes(&sub.id, nodes);
                }
            }
            Some(size) => {
                let mut parent = template.clone();
                parent.array = Some(ArrayRole::Parent {
                    size,
                    ended: 0,
                    failed: 0,
                });
                // The parent never runs; it stays PENDING until its children end.
                parent.status = JobStatus::Pending;
                self.insert_job(parent);
                for index in 0..size {
                    let mut child = template.clone();
                    child.id = JobId::from(format!("{}:{index}", sub.id));
                    child.array = Some(ArrayRole::Child { index, size });
                    let mut waiting = plain.clone();
                    for dep in &sub.depends_on {
                        match (dep.kind, &dep.job) {
                            (DependencyKind::NToN, Some(other)) => {
                                waiting.insert(JobId::from(format!("{other}:{index}")));
                            }
                            (DependencyKind::Sequential, _) if index > 0 => {
                                waiting.insert(JobId::from(format!("{}:{}", sub.id, index - 1)));
                            }
                            _ => {}
                        }
                    }
                    child.waiting_on = waiting;
                    self.admit(child, sub.at);
                }
            }
        }
        outcome
    }

    pub(super) fn insert_job(&mut self, mut job: Job) {
        job.seq = self.next_job_seq;
        self.next_job_seq += 1;
        let key = (job.seq, job.id.clone());
        self.jobs_by_queue
            .entry(job.spec.queue.clone())
            .or_default()
            .insert(key);
        self.jobs.insert(job.id.clone(), Box::new(job));
    }

    /// Stores a new job and moves it past SUBMITTED: FAILED if a dependency already failed,
    /// PENDING while any has not succeeded, RUNNABLE otherwise.
    fn admit(&mut self, mut job: Job, at: Timestamp) {
        let mut failed_dependency = None;
        job.waiting_on
            .retain(|dep| match self.status_for_dependency(dep) {
                Some(JobStatus::Succeeded) => false,
                Some(JobStatus::Failed) => {
                    failed_dependency.get_or_insert_with(|| dep.clone());
                    true
                }
                // A dependency on a sibling created later in this same submit waits for it.
                _ => true,
            });
        let id = job.id.clone();
        if let Some(dep) = failed_dependency {
            job.status = JobStatus::Failed;
            job.status_reason = Some(format!("Dependent Job {dep} failed"));
            job.stopped_at = Some(at);
            job.waiting_on.clear();
            self.insert_job(job);
            self.settle(&id, at);
            return;
        }
        for dep in &job.waiting_on {
            self.dependents
                .entry(dep.clone())
                .or_default()
                .insert(id.clone());
        }
        job.status = if job.waiting_on.is_empty() {
            JobStatus::Runnable
        } else {
            JobStatus::Pending
        };
        if job.status == JobStatus::Runnable {
            job.runnable_since = Some(at);
        }
        let runnable = job.status == JobStatus::Runnable;
        self.insert_job(job);
        if runnable {
            self.runnable.insert(&self.jobs[&id]);
        }
    }

    /// Follows a job that just ended: its dependents are released (it succeeded) or fail in
    /// turn (it failed), and its array parent ends once every child has. Iterative, so a
    /// chain of 10,000 jobs costs time linear in its edges.
    pub(super) fn settle(&mut self, ended: &JobId, at: Timestamp) {
        let mut work = vec![ended.clone()];
        let mut gangs_changed = Vec::new();
        while let Some(id) = work.pop() {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            if let Some(key) = super::archive::ended_root_key(job) {
                self.ended_in_memory.insert(key);
            }
            let succeeded = job.status == JobStatus::Succeeded;
            let parent = job.array_parent();
            for dependent in self.dependents.remove(&id).unwrap_or_default() {
                let Some(d) = self.jobs.get_mut(&dependent) else {
                    continue;
                };
                if d.status.is_terminal() {
                    continue;
                }
                if d.gang_size().is_some() {
                    gangs_changed.push(dependent.clone());
                }
                if succeeded {
                    d.waiting_on.remove(&id);
                    if d.waiting_on.is_empty()
                        && d.status == JobStatus::Pending
                        && d.array
                            .as_ref()
                            .is_none_or(|a| !matches!(a, ArrayRole::Parent { .. }))
                    {
                        d.status = JobStatus::Runnable;
                        d.runnable_since = Some(at);
                        self.runnable.insert(d);
                    }
                } else {
                    d.status = JobStatus::Failed;
                    d.status_reason = Some(format!("Dependent Job {id} failed"));
                    d.stopped_at = Some(at);
                    let waited: Vec<JobId> =
                        std::mem::take(&mut d.waiting_on).into_iter().collect();
                    for other in waited {
                        if let Some(set) = self.dependents.get_mut(&other) {
                            set.remove(&dependent);
                        }
                    }
                    work.push(dependent);
                }
            }
            if let Some(parent_id) = parent
                && let Some(p) = self.jobs.get_mut(&parent_id)
                && !p.status.is_terminal()
                && let Some(ArrayRole::Parent {
                    size,
                    ended,
                    failed,
                }) = p.array.as_mut()
            {
                *ended += 1;
                if !succeeded {
                    *failed += 1;
                }
                if *ended == *size {
                    let any_failed = *failed > 0;
                    p.status = if any_failed {
                        JobStatus::Failed
                    } else {
                        JobStatus::Succeeded
                    };
                    p.status_reason = Some(if any_failed {
                        format!("{failed} of {size} child jobs failed")
                    } else {
                        "All child jobs succeeded".to_owned()
                    });
                    p.stopped_at = Some(at);
                    work.push(parent_id);
                }
            }
        }
        for gang in gangs_changed {
            self.mirror_gang(&gang);
        }
    }

    /// Whether any job ended before `before` (so a purge would have work).
    pub fn has_jobs_ended_before(&self, before: Timestamp) -> bool {
        self.ended.any_stopped_before(before)
            || self
                .jobs
                .values()
                .any(|j| j.status.is_terminal() && j.stopped_at.is_some_and(|t| t < before))
    }

    /// Forgets terminal jobs that stopped before `before` (an array with its children, once
    /// the whole array has ended). Jobs still depended on by a job that has not ended stay.
    pub(super) fn purge(&mut self, before: Timestamp) -> Outcome {
        let old: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.status.is_terminal() && j.stopped_at.is_some_and(|t| t < before))
            .filter(|j| !matches!(j.array, Some(ArrayRole::Child { .. })))
            .filter(|j| j.gang_node().is_none())
            .filter(|j| !self.dependents.contains_key(&j.id))
            .map(|j| j.id.clone())
            .collect();
        let mut purged = 0;
        for id in old {
            let children: Vec<JobId> = self
                .array_children(&id)
                .chain(self.gang_nodes(&id))
                .map(|c| c.id.clone())
                .collect();
            if children.iter().any(|c| self.dependents.contains_key(c)) {
                continue;
            }
            for job_id in children.into_iter().chain([id]) {
                if let Some(job) = self.jobs.remove(&job_id) {
                    if let Some(key) = super::archive::ended_root_key(&job) {
                        self.ended_in_memory.remove(&key);
                    }
                    if let Some(set) = self.jobs_by_queue.get_mut(&job.spec.queue) {
                        set.remove(&(job.seq, job.id.clone()));
                    }
                    purged += 1;
                }
            }
        }
        let forgotten = self.ended.remove_stopped_before(before);
        purged += forgotten.len();
        self.archive.purge(forgotten);
        let (jobs, ended) = (&self.jobs, &self.ended);
        self.client_tokens
            .retain(|_, id| jobs.contains_key(id) || ended.contains(id));
        // Join tokens that expired before the retention's cutoff are of no use any more, even
        // to a list. Revoked agents stay: a denylist that forgets lets the name back in.
        self.join_tokens
            .retain(|_, token| token.expires_at >= before);
        Outcome::Purged { jobs: purged }
    }

    /// Children of an array job, in index order.
    pub fn array_children<'a>(&'a self, parent: &'a JobId) -> impl Iterator<Item = &'a Job> + 'a {
        let size = match self.jobs.get(parent).and_then(|p| p.array.as_ref()) {
            Some(ArrayRole::Parent { size, .. }) => *size,
            _ => 0,
        };
        (0..size).filter_map(move |i| self.job(&JobId::from(format!("{parent}:{i}"))))
    }
}
