//! Whether a command is valid against the state: run by the API before proposing and by
//! `apply` after commit.

use super::*;

impl State {
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
                crate::validate::name("jobDefinitionName", &spec.name)?;
                match &spec.node_properties {
                    Some(nodes) => nodes.check("nodeProperties"),
                    None => Ok(()),
                }
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
            Command::Access(access) => self.check_access(access),
            Command::PurgeJobs { .. }
            | Command::ArchiveEnded { .. }
            | Command::SetClusterLevel { .. }
            | Command::NodeLost { .. }
            | Command::SetWaitReasons { .. }
            | Command::FailUnplaceable { .. }
            | Command::NodeHealth { .. } => Ok(()),
            Command::Admin(admin) => self.check_admin(admin),
        }
    }

    /// Resolves a submission against the state: its queue name and definition.
    pub(super) fn check_submit(
        &self,
        sub: &JobSubmission,
    ) -> Result<(&JobQueue, &JobDefinition), Rejection> {
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
        let share = sub.share_identifier.as_deref();
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
        if definition.node_properties.is_none()
            && definition.extra.get("type").and_then(|t| t.as_str()) == Some("multinode")
        {
            return Err(Rejection::new(
                "jobDefinition",
                format!(
                    "jobDefinition: {} is a multinode definition stored by a release that could not run it; register it again",
                    definition.arn
                ),
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
        if let Some(fabric) = sub.tags.get(crate::FABRIC_TAG)
            && crate::Fabric::parse(fabric).is_none()
        {
            return Err(Rejection::new(
                "tags",
                format!("tags: {}={fabric} must name efa or rdma", crate::FABRIC_TAG),
            ));
        }
        if let Some(bound) = sub.tags.get(crate::TOPOLOGY_TAG)
            && let Err(why) = crate::TopologyBound::parse(bound)
        {
            return Err(Rejection::new(
                "tags",
                format!("tags: {}={why}", crate::TOPOLOGY_TAG),
            ));
        }
        let containers = match Self::node_properties_of(definition, sub)? {
            Some(nodes) => {
                if sub.array_size.is_some() {
                    return Err(Rejection::new(
                        "arrayProperties",
                        "arrayProperties: a multi-node parallel job cannot be an array job",
                    ));
                }
                if sub.overrides != crate::ContainerOverrides::default() {
                    return Err(Rejection::new(
                        "containerOverrides",
                        "containerOverrides: a multi-node parallel job takes nodeOverrides.nodePropertyOverrides instead",
                    ));
                }
                nodes.ranges.into_iter().map(|r| r.container).collect()
            }
            None => vec![definition.container.with_overrides(&sub.overrides)],
        };
        for container in containers {
            let resources = container.resources();
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
        }
        Ok((queue, definition))
    }

    /// The `nodeProperties` a submit of `definition` runs with (its `nodeOverrides` applied),
    /// or `None` for a single-node definition (which takes no `nodeOverrides`).
    pub(super) fn node_properties_of(
        definition: &JobDefinition,
        sub: &JobSubmission,
    ) -> Result<Option<crate::NodeProperties>, Rejection> {
        match (&definition.node_properties, &sub.node_overrides) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(Rejection::new(
                "nodeOverrides",
                format!(
                    "nodeOverrides: job definition {} is not a multinode definition",
                    definition.arn
                ),
            )),
            (Some(nodes), None) => Ok(Some(nodes.clone())),
            (Some(nodes), Some(overrides)) => nodes.with_overrides(overrides).map(Some),
        }
    }
}
