//! Changing and removing compute environments, queues, definitions and scheduling policies,
//! tagging, and cancelling jobs.

use super::{Ending, State};
use crate::{
    AdminCommand, ConfigError, DefinitionStatus, EnabledState, Outcome, Rejection,
    SchedulingPolicy, Tags,
};

fn not_found(field: &str, what: &str, name: &str) -> Rejection {
    Rejection::new(field, format!("{field}: {what} {name} does not exist"))
}

/// Which taggable resource an ARN names.
enum Tagged {
    ComputeEnvironment(String),
    JobQueue(String),
    Definition(String, u32),
    Job(crate::JobId),
    SchedulingPolicy(String),
}

impl State {
    pub fn scheduling_policies(&self) -> impl Iterator<Item = &SchedulingPolicy> {
        self.scheduling_policies.values()
    }

    pub fn scheduling_policy(&self, arn: &str) -> Option<&SchedulingPolicy> {
        self.scheduling_policies.values().find(|p| p.arn.0 == arn)
    }

    fn tagged(&self, arn: &str) -> Option<Tagged> {
        // arn:aws:batch:<region>:<account>:<kind>/<name>
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ["arn", _, "batch", _, _, resource] = parts[..] else {
            return None;
        };
        let (kind, name) = resource.split_once('/')?;
        match kind {
            "compute-environment" => self
                .compute_environments
                .get(name)
                .filter(|c| c.arn.0 == arn)
                .map(|c| Tagged::ComputeEnvironment(c.name.clone())),
            "job-queue" => self
                .queues
                .get(name)
                .filter(|q| q.arn.0 == arn)
                .map(|q| Tagged::JobQueue(q.name.clone())),
            "job-definition" => self
                .definition(arn)
                .map(|d| Tagged::Definition(d.name.clone(), d.revision)),
            // Children of array and multi-node jobs carry no tags of their own.
            "job" if !name.contains(':') && !name.contains('#') => self
                .jobs
                .get(&crate::JobId::from(name))
                .map(|j| Tagged::Job(j.id.clone())),
            "scheduling-policy" => self
                .scheduling_policy(arn)
                .map(|p| Tagged::SchedulingPolicy(p.name.clone())),
            _ => None,
        }
    }

    /// The tags of the resource `arn` names, if it exists and takes tags.
    pub fn tags_of(&self, arn: &str) -> Option<&Tags> {
        Some(match self.tagged(arn)? {
            Tagged::ComputeEnvironment(n) => &self.compute_environments[&n].tags,
            Tagged::JobQueue(n) => &self.queues[&n].tags,
            Tagged::Definition(n, r) => &self.definitions[&n][r as usize - 1].tags,
            Tagged::Job(id) => self.jobs[&id].reported_tags(),
            Tagged::SchedulingPolicy(n) => &self.scheduling_policies[&n].tags,
        })
    }

    fn tags_of_mut(&mut self, arn: &str) -> Option<&mut Tags> {
        Some(match self.tagged(arn)? {
            Tagged::ComputeEnvironment(n) => &mut self.compute_environments.get_mut(&n)?.tags,
            Tagged::JobQueue(n) => &mut self.queues.get_mut(&n)?.tags,
            Tagged::Definition(n, r) => {
                &mut self.definitions.get_mut(&n)?.get_mut(r as usize - 1)?.tags
            }
            // Only jobs that share their spec with no other can be tagged (children cannot).
            Tagged::Job(id) => {
                &mut std::sync::Arc::make_mut(&mut self.jobs.get_mut(&id)?.spec).tags
            }
            Tagged::SchedulingPolicy(n) => &mut self.scheduling_policies.get_mut(&n)?.tags,
        })
    }

    pub(super) fn check_admin(&self, cmd: &AdminCommand) -> Result<(), Rejection> {
        match cmd {
            AdminCommand::DrainNode { node, .. } => {
                if self.nodes.contains_key(node) {
                    Ok(())
                } else {
                    Err(Rejection::new(
                        "node",
                        format!("node: no agent named {node} has registered"),
                    ))
                }
            }
            AdminCommand::SetArnScope(scope) => {
                if let Err(e) = scope.check() {
                    let field = match &e {
                        ConfigError::Invalid { field, .. } => *field,
                        ConfigError::Parse(_) => "region",
                    };
                    return Err(Rejection::new(field, e.to_string()));
                }
                // ARNs are stored with what they name (compute environments, queues, users):
                // the scope is fixed once anything has one.
                let named_anything = !self.compute_environments.is_empty()
                    || !self.queues.is_empty()
                    || !self.definitions.is_empty()
                    || !self.jobs.is_empty()
                    || !self.scheduling_policies.is_empty()
                    || !self.users.is_empty();
                if *scope != self.scope && named_anything {
                    return Err(Rejection::new(
                        "region",
                        format!(
                            "region: this cluster's ARNs already name region {} and account {}; they are set when the cluster is founded",
                            self.scope.region, self.scope.account
                        ),
                    ));
                }
                Ok(())
            }
            AdminCommand::UpdateComputeEnvironment {
                compute_environment,
                ..
            } => self
                .compute_environment(compute_environment)
                .map(|_| ())
                .ok_or_else(|| {
                    not_found(
                        "computeEnvironment",
                        "compute environment",
                        compute_environment,
                    )
                }),
            AdminCommand::DeleteComputeEnvironment {
                compute_environment,
            } => {
                let ce = self
                    .compute_environment(compute_environment)
                    .ok_or_else(|| {
                        not_found(
                            "computeEnvironment",
                            "compute environment",
                            compute_environment,
                        )
                    })?;
                if ce.state != EnabledState::Disabled {
                    return Err(Rejection::new(
                        "computeEnvironment",
                        format!(
                            "computeEnvironment: {} must be DISABLED before it is deleted",
                            ce.name
                        ),
                    ));
                }
                if let Some(q) = self.queues.values().find(|q| {
                    q.compute_environment_order
                        .iter()
                        .any(|o| o.compute_environment == ce.name)
                }) {
                    return Err(Rejection::new(
                        "computeEnvironment",
                        format!(
                            "computeEnvironment: {} is still used by job queue {}",
                            ce.name, q.name
                        ),
                    ));
                }
                Ok(())
            }
            AdminCommand::UpdateJobQueue {
                job_queue,
                compute_environment_order,
                scheduling_policy_arn,
                ..
            } => {
                self.queue(job_queue)
                    .ok_or_else(|| not_found("jobQueue", "job queue", job_queue))?;
                if let Some(order) = compute_environment_order {
                    self.check_ce_order(order)?;
                }
                if let Some(arn) = scheduling_policy_arn
                    && self.scheduling_policy(arn).is_none()
                {
                    return Err(not_found("schedulingPolicyArn", "scheduling policy", arn));
                }
                Ok(())
            }
            AdminCommand::DeleteJobQueue { job_queue, .. } => {
                let queue = self
                    .queue(job_queue)
                    .ok_or_else(|| not_found("jobQueue", "job queue", job_queue))?;
                if queue.state != EnabledState::Disabled {
                    return Err(Rejection::new(
                        "jobQueue",
                        format!(
                            "jobQueue: {} must be DISABLED before it is deleted",
                            queue.name
                        ),
                    ));
                }
                Ok(())
            }
            AdminCommand::DeregisterJobDefinition { job_definition } => {
                let explicit = job_definition.starts_with("arn:") || job_definition.contains(':');
                match self.definition(job_definition) {
                    Some(_) if explicit => Ok(()),
                    Some(_) => Err(Rejection::new(
                        "jobDefinition",
                        "jobDefinition: name a revision (name:revision) or an ARN".to_owned(),
                    )),
                    None => Err(not_found("jobDefinition", "job definition", job_definition)),
                }
            }
            // As AWS: cancelling a job that does not exist (or was purged) is no error.
            AdminCommand::CancelJob { .. } => Ok(()),
            AdminCommand::CreateSchedulingPolicy(p) => {
                crate::validate::name("name", &p.name)?;
                if self.scheduling_policies.contains_key(&p.name) {
                    return Err(Rejection::new(
                        "name",
                        format!("name: scheduling policy {} already exists", p.name),
                    ));
                }
                Ok(())
            }
            AdminCommand::UpdateSchedulingPolicy { arn, .. } => self
                .scheduling_policy(arn)
                .map(|_| ())
                .ok_or_else(|| not_found("arn", "scheduling policy", arn)),
            AdminCommand::DeleteSchedulingPolicy { arn } => {
                self.scheduling_policy(arn)
                    .ok_or_else(|| not_found("arn", "scheduling policy", arn))?;
                if let Some(q) = self
                    .queues
                    .values()
                    .find(|q| q.scheduling_policy_arn.as_deref() == Some(arn))
                {
                    return Err(Rejection::new(
                        "arn",
                        format!("arn: scheduling policy is used by job queue {}", q.name),
                    ));
                }
                Ok(())
            }
            AdminCommand::TagResource { arn, tags } => {
                self.check_job_tags_may_change(arn)?;
                let existing = self
                    .tags_of(arn)
                    .ok_or_else(|| not_found("resourceArn", "resource", arn))?;
                let merged = existing
                    .keys()
                    .chain(tags.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                if merged > 50 {
                    return Err(Rejection::new(
                        "tags",
                        format!(
                            "tags: a resource may have at most 50 tags ({merged} after this call)"
                        ),
                    ));
                }
                Ok(())
            }
            AdminCommand::UntagResource { arn, .. } => {
                self.check_job_tags_may_change(arn)?;
                self.tags_of(arn)
                    .map(|_| ())
                    .ok_or_else(|| not_found("resourceArn", "resource", arn))
            }
        }
    }

    /// An ended job's tags are fixed: once it leaves memory its record is in each node's
    /// archive, which `apply` never rewrites.
    fn check_job_tags_may_change(&self, arn: &str) -> Result<(), Rejection> {
        let Some(id) = arn
            .rsplit_once(":job/")
            .map(|(_, id)| crate::JobId::from(id))
        else {
            return Ok(());
        };
        let ended = match self.jobs.get(&id) {
            Some(job) => job.status.is_terminal(),
            None => self.ended.contains(&id),
        };
        if ended {
            return Err(Rejection::new(
                "resourceArn",
                format!("resourceArn: job {id} has ended; its tags no longer change"),
            ));
        }
        Ok(())
    }

    /// `computeEnvironmentOrder`: 1 to 3 existing environments with distinct orders.
    pub(super) fn check_ce_order(&self, order: &[crate::CeOrder]) -> Result<(), Rejection> {
        if order.is_empty() {
            return Err(Rejection::new(
                "computeEnvironmentOrder",
                // AWS's own words, which clients match on.
                "At least 1 compute environment must be provided",
            ));
        }
        if order.len() > 3 {
            return Err(Rejection::new(
                "computeEnvironmentOrder",
                "computeEnvironmentOrder: at most 3 compute environments may be associated with a queue",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in order {
            if self
                .compute_environment(&entry.compute_environment)
                .is_none()
            {
                return Err(Rejection::new(
                    "computeEnvironmentOrder.computeEnvironment",
                    format!(
                        "computeEnvironmentOrder.computeEnvironment: compute environment {} does not exist",
                        entry.compute_environment
                    ),
                ));
            }
            if !seen.insert(entry.order) {
                return Err(Rejection::new(
                    "computeEnvironmentOrder.order",
                    format!(
                        "computeEnvironmentOrder.order: order {} is used twice",
                        entry.order
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn apply_admin(&mut self, cmd: AdminCommand) -> Outcome {
        match cmd {
            AdminCommand::SetArnScope(scope) => self.scope = scope,
            AdminCommand::DrainNode { node, draining } => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.draining = draining;
                }
            }
            AdminCommand::UpdateComputeEnvironment {
                compute_environment,
                state,
                unmanaged_vcpus,
                service_role,
                extra,
            } => {
                let Some(name) = self
                    .compute_environment(&compute_environment)
                    .map(|c| c.name.clone())
                else {
                    return Outcome::Ignored("no such compute environment".into());
                };
                let ce = self
                    .compute_environments
                    .get_mut(&name)
                    .expect("found above");
                if let Some(s) = state {
                    ce.state = s;
                }
                if unmanaged_vcpus.is_some() {
                    ce.unmanaged_vcpus = unmanaged_vcpus;
                }
                if service_role.is_some() {
                    ce.service_role = service_role;
                }
                ce.extra.extend(extra);
            }
            AdminCommand::DeleteComputeEnvironment {
                compute_environment,
            } => {
                if let Some(name) = self
                    .compute_environment(&compute_environment)
                    .map(|c| c.name.clone())
                {
                    self.compute_environments.remove(&name);
                }
            }
            AdminCommand::UpdateJobQueue {
                job_queue,
                state,
                priority,
                compute_environment_order,
                scheduling_policy_arn,
                time_limit_actions,
                extra,
            } => {
                let Some(name) = self.queue(&job_queue).map(|q| q.name.clone()) else {
                    return Outcome::Ignored("no such job queue".into());
                };
                let resolved = compute_environment_order.map(|order| self.resolve_ce_order(order));
                let q = self.queues.get_mut(&name).expect("found above");
                if let Some(s) = state {
                    q.state = s;
                }
                if let Some(p) = priority {
                    q.priority = p;
                }
                if let Some(order) = resolved {
                    q.compute_environment_order = order;
                }
                if scheduling_policy_arn.is_some() {
                    q.scheduling_policy_arn = scheduling_policy_arn;
                }
                if let Some(actions) = time_limit_actions {
                    q.time_limit_actions = actions;
                }
                q.extra.extend(extra);
            }
            AdminCommand::DeleteJobQueue { job_queue, at } => {
                let Some(name) = self.queue(&job_queue).map(|q| q.name.clone()) else {
                    return Outcome::Ignored("no such job queue".into());
                };
                let open: Vec<crate::JobId> = self
                    .jobs_in_queue(&name, None)
                    .filter(|j| !j.status.is_terminal())
                    .map(|j| j.id.clone())
                    .collect();
                for id in open {
                    self.end_job(
                        &id,
                        format!("Job queue {name} was deleted"),
                        at,
                        Ending::Terminate,
                    );
                }
                self.queues.remove(&name);
                self.runnable.remove_queue(&name);
                self.share_usage.remove(&name);
            }
            AdminCommand::DeregisterJobDefinition { job_definition } => {
                let Some((name, revision)) = self
                    .definition(&job_definition)
                    .map(|d| (d.name.clone(), d.revision))
                else {
                    return Outcome::Ignored("no such job definition".into());
                };
                if let Some(d) = self
                    .definitions
                    .get_mut(&name)
                    .and_then(|revs| revs.get_mut(revision as usize - 1))
                {
                    d.status = DefinitionStatus::Inactive;
                }
            }
            AdminCommand::CancelJob { job, reason, at } => {
                return self.end_job(&job, reason, at, Ending::Cancel);
            }
            AdminCommand::CreateSchedulingPolicy(mut p) => {
                p.arn = self.scope.arn("scheduling-policy", &p.name);
                self.scheduling_policies.insert(p.name.clone(), p);
            }
            AdminCommand::UpdateSchedulingPolicy { arn, fairshare } => {
                if let Some(p) = self
                    .scheduling_policies
                    .values_mut()
                    .find(|p| p.arn.0 == arn)
                {
                    p.fairshare = fairshare;
                }
            }
            AdminCommand::DeleteSchedulingPolicy { arn } => {
                self.scheduling_policies.retain(|_, p| p.arn.0 != arn);
            }
            AdminCommand::TagResource { arn, tags } => {
                if let Some(existing) = self.tags_of_mut(&arn) {
                    existing.extend(tags);
                }
            }
            AdminCommand::UntagResource { arn, keys } => {
                if let Some(existing) = self.tags_of_mut(&arn) {
                    for k in keys {
                        existing.remove(&k);
                    }
                }
            }
        }
        Outcome::Done
    }

    /// Names the compute environments of an order (given by name or ARN), sorted by order.
    pub(super) fn resolve_ce_order(&self, mut order: Vec<crate::CeOrder>) -> Vec<crate::CeOrder> {
        for entry in &mut order {
            if let Some(ce) = self.compute_environment(&entry.compute_environment) {
                entry.compute_environment = ce.name.clone();
            }
        }
        order.sort_by_key(|e| e.order);
        order
    }
}
