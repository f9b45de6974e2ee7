//! Placing attempts, their reports, and what they hold of nodes and shares.

use super::*;

impl State {
    /// Why `placement` cannot be applied to this state, if it cannot.
    pub fn placement_conflict(&self, placement: &Placement) -> Option<String> {
        let Some(job) = self.jobs.get(&placement.job) else {
            return Some("job does not exist".into());
        };
        // A multi-node job is placed through its nodes, all together (`gang_conflict`).
        if job.gang_size().is_some() {
            return Some("a multi-node job is placed through its nodes".into());
        }
        if job.status != JobStatus::Runnable {
            return Some(format!("job is {}", job.status.as_aws()));
        }
        let Some(node) = self.nodes.get(&placement.node) else {
            return Some("node does not exist".into());
        };
        if node.status != NodeStatus::Ready {
            return Some("node is not ready".into());
        }
        if node.draining {
            return Some("node is draining".into());
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

    pub(super) fn place(
        &mut self,
        term: u64,
        at: Timestamp,
        placements: Vec<Placement>,
    ) -> Outcome {
        let (mut placed, mut refused) = (0, 0);
        let mut placements = placements.into_iter().peekable();
        while let Some(p) = placements.next() {
            // The nodes of a multi-node job come together, and are placed together or not at all.
            let gang = self.jobs.get(&p.job).and_then(|j| j.gang_node());
            if let Some((parent, _, _)) = gang {
                let mut members = vec![p];
                while let Some(next) = placements.next_if(|n| {
                    self.jobs
                        .get(&n.job)
                        .and_then(|j| j.gang_node())
                        .is_some_and(|(of, _, _)| of == parent)
                }) {
                    members.push(next);
                }
                let count = members.len();
                if self.place_gang(term, at, &parent, members) {
                    placed += count;
                } else {
                    refused += count;
                }
                continue;
            }
            // (A node of a multi-node job never gets here: its gang was taken above.)
            if self.placement_conflict(&p).is_some() || !self.place_one(term, at, p) {
                refused += 1;
            } else {
                placed += 1;
            }
        }
        Outcome::Placed { placed, refused }
    }

    /// Applies one placement that was checked.
    pub(super) fn place_one(&mut self, term: u64, at: Timestamp, p: Placement) -> bool {
        let (Some(job), Some(node)) = (self.jobs.get_mut(&p.job), self.nodes.get_mut(&p.node))
        else {
            return false;
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
            node.allocated_unbounded = node.allocated_unbounded + job.spec.container.resources();
        }
        track_share(&mut self.share_running, job, true);
        node.placed_jobs.insert(job.id.clone());
        if job.gang_node().is_some() {
            node.gang_nodes += 1;
        }
        true
    }

    pub(super) fn report(
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
                self.gang_node_running(id, at);
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
                    if job.gang_node().is_some() {
                        n.gang_nodes = n.gang_nodes.saturating_sub(1);
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
                // A node of a multi-node job ends with its gang, which decides what follows.
                if job.gang_node().is_some() {
                    self.gang_node_exited(id, at);
                    return Outcome::Done;
                }
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

/// Adds (`placed`) or removes a placed job's vCPUs to its share identifier's running total.
pub(super) fn track_share(
    running: &mut BTreeMap<String, BTreeMap<String, u64>>,
    job: &Job,
    placed: bool,
) {
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
