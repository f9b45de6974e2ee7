//! `muster-sched`: the pure planner.
//!
//! [`plan`] looks at a read-only [`State`] and returns a [`Plan`]: which RUNNABLE job goes to
//! which node, and for every job it looked at but could not place, why (as data). [`verify`]
//! is the plan applier's re-check against the newest state before the plan is proposed.
//! Neither writes anything; only the leader's plan applier turns a plan into a command.
//!
//! Order: queues in descending priority (then by name, so that equal priorities are
//! deterministic); FIFO by submit time within a queue; each queue tries its compute
//! environments in `order`. Fit: vCPU, memory and GPU count; best fit picks the node that
//! leaves the least free vCPU, then memory.
//!
//! Must not depend on: tokio, tonic, prost, sled, openraft, clocks, randomness or any IO.

use muster_core::{EnabledState, Job, JobId, NodeId, NodeStatus, Placement, Resources, State};
use std::collections::{BTreeMap, BTreeSet};

/// Limits on one planning round, so that a round stays short however long the queues are.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Placements per round; the next round continues where this one stopped.
    pub max_placements: usize,
    /// RUNNABLE jobs examined per queue per round.
    pub max_examined_per_queue: usize,
    /// A queue stops being examined after this many jobs in a row found no room: deeper in
    /// a full queue the answer is the same, and a round must stay short.
    pub max_misses_in_a_row: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            max_placements: 10_000,
            max_examined_per_queue: 10_000,
            max_misses_in_a_row: 256,
        }
    }
}

/// Why a RUNNABLE job was not placed this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// No ready node in any of the queue's enabled compute environments has this much free.
    InsufficientCapacity {
        needs: Resources,
        compute_environments: Vec<String>,
    },
    /// None of the queue's compute environments is enabled or has a ready node.
    NoNodes { compute_environments: Vec<String> },
    /// Bigger than every ready node of the queue's compute environments, even empty.
    NeverFits {
        needs: Resources,
        compute_environments: Vec<String>,
    },
}

impl WaitReason {
    /// The category AWS Batch names in `statusReason` and in `jobStateTimeLimitActions`.
    pub fn category(&self) -> &'static str {
        match self {
            WaitReason::NeverFits { .. } => "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
            WaitReason::InsufficientCapacity { .. } | WaitReason::NoNodes { .. } => {
                "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub job: JobId,
    pub reason: WaitReason,
    /// RUNNABLE jobs of the same queue ahead of this one.
    pub jobs_ahead: usize,
}

fn describe_resources(r: &Resources) -> String {
    let mut parts = vec![
        format!("{} vCPU", r.vcpus()),
        format!("{} MiB", r.memory_mib),
    ];
    if r.gpus > 0 {
        parts.push(format!("{} GPU", r.gpus));
    }
    parts.join(", ")
}

impl Unplaced {
    /// The `statusReason` a user reads: what is short, where, and how many jobs are ahead;
    /// or, for a job no node can ever hold, AWS's `MISCONFIGURATION:` prefix that workflow
    /// engines act on.
    pub fn status_reason(&self) -> String {
        match &self.reason {
            WaitReason::InsufficientCapacity {
                needs,
                compute_environments,
            } => format!(
                "RUNNABLE: waiting for {} in {}; {} jobs ahead",
                describe_resources(needs),
                compute_environments.join(", "),
                self.jobs_ahead
            ),
            WaitReason::NoNodes {
                compute_environments,
            } if compute_environments.is_empty() => {
                format!(
                    "RUNNABLE: the queue has no enabled compute environment; {} jobs ahead",
                    self.jobs_ahead
                )
            }
            WaitReason::NoNodes {
                compute_environments,
            } => format!(
                "RUNNABLE: no ready node in {}; {} jobs ahead",
                compute_environments.join(", "),
                self.jobs_ahead
            ),
            WaitReason::NeverFits {
                needs,
                compute_environments,
            } => format!(
                "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs {}; no node in {} is that large",
                describe_resources(needs),
                compute_environments.join(", ")
            ),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
}

/// Plans one round. Deterministic: the same state and config give the same plan.
pub fn plan(state: &State, config: &PlanConfig) -> Plan {
    let mut out = Plan::default();
    // Free capacity as this plan consumes it.
    let mut free: BTreeMap<&NodeId, Resources> = state
        .nodes()
        .filter(|n| n.status == NodeStatus::Ready)
        .map(|n| (&n.id, n.free()))
        .collect();

    // GPU indices this plan has already handed out, per node.
    let mut gpus_taken: BTreeMap<&NodeId, BTreeSet<u32>> = BTreeMap::new();

    let mut queues: Vec<_> = state
        .queues()
        .filter(|q| q.state == EnabledState::Enabled)
        .collect();
    queues.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });

    for queue in queues {
        let ces: Vec<String> = queue
            .compute_environment_order
            .iter()
            .filter(|e| {
                state
                    .compute_environment(&e.compute_environment)
                    .is_some_and(|ce| ce.state == EnabledState::Enabled)
            })
            .map(|e| e.compute_environment.clone())
            .collect();
        let mut misses = 0;
        for (position, job) in state
            .runnable_jobs(&queue.name)
            .take(config.max_examined_per_queue)
            .enumerate()
        {
            if out.placements.len() >= config.max_placements {
                return out;
            }
            if misses >= config.max_misses_in_a_row {
                break;
            }
            match best_fit(state, job, &ces, &free) {
                Some(node) => {
                    let need = job.container.resources();
                    if let Some(f) = free.get_mut(node) {
                        *f = f.saturating_sub(&need);
                    }
                    let held = gpus_taken.entry(node).or_default();
                    let gpus: Vec<u32> = state
                        .node(node)
                        .into_iter()
                        .flat_map(|n| n.free_gpus())
                        .filter(|i| !held.contains(i))
                        .take(need.gpus as usize)
                        .collect();
                    held.extend(gpus.iter().copied());
                    out.placements.push(Placement {
                        job: job.id.clone(),
                        node: node.clone(),
                        gpus,
                    });
                    misses = 0;
                }
                None => {
                    let reason = why_unplaced(state, job, &ces);
                    // A job that fits no node at all says nothing about the jobs behind it.
                    if !matches!(reason, WaitReason::NeverFits { .. }) {
                        misses += 1;
                    }
                    out.unplaced.push(Unplaced {
                        job: job.id.clone(),
                        reason,
                        jobs_ahead: position,
                    });
                }
            }
        }
    }
    out
}

/// The node in the first compute environment (in queue order) that fits the job, leaving the
/// least free vCPU and then memory behind.
fn best_fit<'s>(
    state: &'s State,
    job: &Job,
    ces: &[String],
    free: &BTreeMap<&'s NodeId, Resources>,
) -> Option<&'s NodeId> {
    let need = job.container.resources();
    ces.iter().find_map(|ce| {
        state
            .nodes()
            .filter(|n| &n.compute_environment == ce)
            .filter_map(|n| free.get(&n.id).map(|f| (&n.id, *f)))
            .filter(|(_, f)| need.fits_in(f))
            .min_by_key(|(id, f)| {
                (
                    f.millicpus - need.millicpus,
                    f.memory_mib - need.memory_mib,
                    *id,
                )
            })
            .map(|(id, _)| id)
    })
}

fn why_unplaced(state: &State, job: &Job, ces: &[String]) -> WaitReason {
    let has_nodes = state
        .nodes()
        .any(|n| n.status == NodeStatus::Ready && ces.contains(&n.compute_environment));
    let need = job.container.resources();
    let fits_an_empty_node = state
        .nodes()
        .filter(|n| n.status == NodeStatus::Ready && ces.contains(&n.compute_environment))
        .any(|n| need.fits_in(&n.inventory.capacity));
    if has_nodes && !fits_an_empty_node {
        WaitReason::NeverFits {
            needs: need,
            compute_environments: ces.to_vec(),
        }
    } else if has_nodes {
        WaitReason::InsufficientCapacity {
            needs: job.container.resources(),
            compute_environments: ces.to_vec(),
        }
    } else {
        WaitReason::NoNodes {
            compute_environments: ces.to_vec(),
        }
    }
}

/// The plan applier's re-check: keeps the placements that still hold against `state` (job
/// still RUNNABLE, node ready and in the queue's compute environments, capacity free counting
/// the placements kept before it) and drops the rest.
pub fn verify(state: &State, plan: Plan) -> Plan {
    let mut used: BTreeMap<NodeId, Resources> = BTreeMap::new();
    let mut gpus_used: BTreeSet<(NodeId, u32)> = BTreeSet::new();
    let mut seen_jobs = BTreeSet::new();
    let placements = plan
        .placements
        .into_iter()
        .filter(|p| {
            if state.placement_conflict(p).is_some() || !seen_jobs.insert(p.job.clone()) {
                return false;
            }
            let (Some(job), Some(node)) = (state.job(&p.job), state.node(&p.node)) else {
                return false;
            };
            let need = job.container.resources();
            let already = used.entry(p.node.clone()).or_default();
            if !(*already + need).fits_in(&node.free()) {
                return false;
            }
            if p.gpus
                .iter()
                .any(|g| gpus_used.contains(&(p.node.clone(), *g)))
            {
                return false;
            }
            *already = *already + need;
            gpus_used.extend(p.gpus.iter().map(|g| (p.node.clone(), *g)));
            true
        })
        .collect();
    Plan {
        placements,
        unplaced: plan.unplaced,
    }
}

#[cfg(test)]
mod tests;
