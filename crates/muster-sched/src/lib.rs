//! `muster-sched`: the pure planner.
//!
//! [`plan`] looks at a read-only [`State`] at a given time and returns a [`Plan`]: which
//! RUNNABLE job goes to which node (and which of its GPUs), and for every job it looked at but
//! could not place, why (as data). [`verify`] is the plan applier's re-check against the
//! newest state before the plan is proposed. Neither writes anything; only the leader's plan
//! applier turns a plan into a command.
//!
//! - **Order**: queues in descending priority (then by name, so that equal priorities are
//!   deterministic); within a queue first in, first out, or fair share when the queue has a
//!   scheduling policy ([`order`]); each queue tries its compute environments in `order`.
//! - **Fit**: vCPU, memory, GPU count, GPU model and node labels the job requires; best fit
//!   (least free vCPU, then memory, left behind) unless the compute environment asks for
//!   spread ([`pool`]).
//! - **Head of line**: the first job of each queue that does not fit gets a reservation on
//!   the node where it fits soonest; later jobs run around it only where their timeouts
//!   prove they cannot delay it ([`reservations`]).
//! - **Gangs**: a multi-node job is placed whole, each node on a worker of its own, in the
//!   narrowest topology domain that holds it, or not at all; at the head of its queue it
//!   reserves a worker for every node ([`gang`]). The plan lists a gang's placements
//!   together, and [`verify`] (like `apply`) keeps or drops them together.
//! - **Cost**: a round examines at most `max_examined_per_queue` jobs a queue and stops a
//!   queue after `max_misses_in_a_row` misses, so a million waiting jobs behind a blocked
//!   head cost what 256 do; nodes are found by range lookups on free capacity.
//!
//! Must not depend on: tokio, tonic, prost, sled, openraft, clocks, randomness or any IO.

mod gang;
mod order;
mod pool;
mod reservations;

pub use pool::{ALLOCATION_STRATEGY_TAG, AllocationStrategy};
pub use reservations::Reservation;

use muster_core::{EnabledState, Job, JobId, NodeId, Placement, Resources, State, Timestamp};
use order::QueueOrder;
use pool::Pool;
use reservations::Reservations;
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
            // One round's placements are one Raft entry, and an entry must reach a busy
            // follower within one heartbeat interval (see muster-raft's append budget):
            // 10,000 placements made entries of megabytes that a loaded follower never
            // acknowledged in time, so it fell behind for good and kept calling elections.
            max_placements: 2_500,
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
        /// Distinct nodes it needs `needs` on (1, or the size of a multi-node job).
        nodes: u32,
        /// Where they must be, as ` in one rack` (or empty).
        requirements: String,
        compute_environments: Vec<String>,
    },
    /// None of the queue's compute environments is enabled or has a ready node.
    NoNodes { compute_environments: Vec<String> },
    /// The queue's fair-share policy keeps the rest for share identifiers not running yet
    /// (`computeReservation`).
    ShareReserve { share: String, percent: u64 },
    /// No node of the queue's compute environments, even empty, can hold it (too large, or
    /// lacking a label or GPU model it requires).
    NeverFits {
        needs: Resources,
        /// Distinct nodes it needs `needs` on (1, or the size of a multi-node job).
        nodes: u32,
        /// The labels and GPU model it requires, as ` with k=v, GPU model M` (or empty).
        requirements: String,
        compute_environments: Vec<String>,
    },
}

impl WaitReason {
    /// The category AWS Batch names in `statusReason` and in `jobStateTimeLimitActions`.
    pub fn category(&self) -> &'static str {
        match self {
            WaitReason::NeverFits { .. } => "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
            WaitReason::InsufficientCapacity { .. }
            | WaitReason::NoNodes { .. }
            | WaitReason::ShareReserve { .. } => "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub job: JobId,
    pub reason: WaitReason,
    /// RUNNABLE jobs of the same queue ahead of this one.
    pub jobs_ahead: usize,
    /// The room held for it, when it is the head of its queue and backfill applies.
    pub reservation: Option<Reservation>,
}

fn describe_resources(r: &Resources, nodes: u32) -> String {
    let mut parts = vec![
        format!("{} vCPU", r.vcpus()),
        format!("{} MiB", r.memory_mib),
    ];
    if r.gpus > 0 {
        parts.push(format!("{} GPU", r.gpus));
    }
    match nodes {
        1 => parts.join(", "),
        n => format!("{n} nodes with {} each", parts.join(", ")),
    }
}

/// Epoch milliseconds as UTC `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

impl Unplaced {
    /// The `statusReason` a user reads: what is short, where, and how many jobs are ahead;
    /// or, for a job no node can ever hold, AWS's `MISCONFIGURATION:` prefix that workflow
    /// engines act on.
    pub fn status_reason(&self) -> String {
        match &self.reason {
            WaitReason::InsufficientCapacity {
                needs,
                nodes,
                requirements,
                compute_environments,
            } => format!(
                "RUNNABLE: waiting for {}{requirements} in {}; {} jobs ahead{}",
                describe_resources(needs, *nodes),
                compute_environments.join(", "),
                self.jobs_ahead,
                match (&self.reservation, nodes) {
                    (None, _) => String::new(),
                    (Some(r), 1) => format!("; room reserved on {}", r.node),
                    (Some(r), n) => format!(
                        "; room reserved on {n} nodes{}",
                        r.starts_at
                            .map(|t| format!(", planned start by {}", utc(t)))
                            .unwrap_or_default()
                    ),
                }
            ),
            WaitReason::ShareReserve { share, percent } => format!(
                "RUNNABLE: share {share} waits; the queue's fair-share policy keeps {percent}% of capacity for share identifiers not running yet; {} jobs ahead",
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
                nodes: 1,
                requirements,
                compute_environments,
            } => format!(
                "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs {}{}; no node in {} can hold it",
                describe_resources(needs, 1),
                requirements,
                compute_environments.join(", ")
            ),
            WaitReason::NeverFits {
                needs,
                nodes,
                requirements,
                compute_environments,
            } => format!(
                "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs {}{}; {} does not have {nodes} nodes that can hold them",
                describe_resources(needs, *nodes),
                requirements,
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

/// Plans one round at time `now`. Deterministic: the same state, config and time give the
/// same plan.
pub fn plan(state: &State, config: &PlanConfig, now: Timestamp) -> Plan {
    let mut out = Plan::default();
    let mut reservations = Reservations::default();

    let mut queues: Vec<_> = state
        .queues()
        .filter(|q| q.state == EnabledState::Enabled)
        .collect();
    // Only environments that a queue with jobs waiting reaches: submits piling up in one
    // queue do not make every round look at the nodes of environments nobody waits for.
    let wanted = queues
        .iter()
        .filter(|q| state.runnable_count(&q.name) > 0)
        .flat_map(|q| &q.compute_environment_order)
        .map(|e| e.compute_environment.as_str())
        .collect();
    let mut pool = Pool::new(state, &wanted);
    queues.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });

    for queue in queues {
        // Each enabled environment once: a queue that named one twice (as a name and as its
        // ARN, say) would offer each worker twice, and a gang could be given one worker for
        // two of its nodes.
        let mut ces: Vec<String> = Vec::new();
        for entry in &queue.compute_environment_order {
            if let Some(ce) = state
                .compute_environment(&entry.compute_environment)
                .filter(|ce| ce.state == EnabledState::Enabled)
                && !ces.contains(&ce.name)
            {
                ces.push(ce.name.clone());
            }
        }
        let mut order = QueueOrder::new(state, queue, now);
        let mut head_reserved = false;
        let mut misses = 0;
        let mut position = 0;
        while let Some(job) = order.next() {
            if position >= config.max_examined_per_queue || misses >= config.max_misses_in_a_row {
                break;
            }
            if out.placements.len() >= config.max_placements {
                return out;
            }
            position += 1;
            let jobs_ahead = position - 1;
            if job.gang_size().is_some() {
                let nodes: Vec<&Job> = state.gang_nodes(&job.id).collect();
                if out.placements.len() + nodes.len() > config.max_placements
                    && !out.placements.is_empty()
                {
                    // A gang goes whole into one entry: it waits for the next round.
                    return out;
                }
                // A fair-share queue's computeReservation counts every node of the gang.
                let need: u64 = nodes
                    .iter()
                    .map(|n| n.spec.container.resources().millicpus)
                    .sum();
                if !order.within_reservation(job, need, || pool.millicpus(&ces)) {
                    let QueueOrder::FairShare(fs) = &order else {
                        unreachable!("only fair-share queues keep a reserve")
                    };
                    out.unplaced.push(Unplaced {
                        job: job.id.clone(),
                        reason: WaitReason::ShareReserve {
                            share: job.spec.share_identifier.clone().unwrap_or_default(),
                            percent: fs.policy.compute_reservation,
                        },
                        jobs_ahead,
                        reservation: None,
                    });
                    misses += 1;
                    order.missed(job);
                    continue;
                }
                let ends_by = reservations::ends_by(job, now);
                match gang::find(&pool, job, &nodes, &ces, &reservations, now) {
                    Some(chosen) => {
                        for (node_job, worker) in nodes.iter().zip(chosen) {
                            let gpus = pool.take(worker, node_job, ends_by);
                            reservations.charge(
                                worker,
                                &node_job.spec.container.resources(),
                                ends_by,
                            );
                            out.placements.push(Placement {
                                job: node_job.id.clone(),
                                node: worker.clone(),
                                gpus,
                            });
                        }
                        // Fair share charges the gang for every node it holds.
                        for node_job in &nodes {
                            order.placed(node_job);
                        }
                        misses = 0;
                    }
                    None => {
                        let reason = gang::why_unplaced(&pool, job, &nodes, &ces);
                        let mut reservation = None;
                        if !matches!(reason, WaitReason::NeverFits { .. }) {
                            if matches!(reason, WaitReason::InsufficientCapacity { .. })
                                && !head_reserved
                            {
                                head_reserved = true;
                                reservation =
                                    reservations.reserve_gang(state, &pool, job, &nodes, &ces, now);
                            }
                            misses += 1;
                            order.missed(job);
                        }
                        out.unplaced.push(Unplaced {
                            job: job.id.clone(),
                            reason,
                            jobs_ahead,
                            reservation,
                        });
                    }
                }
                continue;
            }
            let need = job.spec.container.resources();
            let ends_by = reservations::ends_by(job, now);
            let found = if order.within_reservation(job, need.millicpus, || pool.millicpus(&ces)) {
                pool.find(job, &ces, &reservations, ends_by)
                    .ok_or_else(|| why_unplaced(&pool, job, &ces))
            } else {
                let QueueOrder::FairShare(fs) = &order else {
                    unreachable!("only fair-share queues keep a reserve")
                };
                Err(WaitReason::ShareReserve {
                    share: job.spec.share_identifier.clone().unwrap_or_default(),
                    percent: fs.policy.compute_reservation,
                })
            };
            match found {
                Ok(node) => {
                    let gpus = pool.take(node, job, ends_by);
                    reservations.charge(node, &need, ends_by);
                    order.placed(job);
                    out.placements.push(Placement {
                        job: job.id.clone(),
                        node: node.clone(),
                        gpus,
                    });
                    misses = 0;
                }
                Err(reason) => {
                    let mut reservation = None;
                    match reason {
                        // A job that fits no node at all says nothing about the jobs behind it.
                        WaitReason::NeverFits { .. } => {}
                        WaitReason::InsufficientCapacity { .. } if !head_reserved => {
                            head_reserved = true;
                            reservation = reservations.reserve(state, &pool, job, &ces, now);
                            misses += 1;
                            order.missed(job);
                        }
                        _ => {
                            misses += 1;
                            order.missed(job);
                        }
                    }
                    out.unplaced.push(Unplaced {
                        job: job.id.clone(),
                        reason,
                        jobs_ahead,
                        reservation,
                    });
                }
            }
        }
    }
    out
}

fn why_unplaced(pool: &Pool, job: &muster_core::Job, ces: &[String]) -> WaitReason {
    let needs = job.spec.container.resources();
    let compute_environments = ces.to_vec();
    let nodes = 1;
    if !pool.has_ready_node(ces) {
        WaitReason::NoNodes {
            compute_environments,
        }
    } else if !pool.could_ever_hold(job, ces) {
        WaitReason::NeverFits {
            needs,
            nodes,
            requirements: requirements(job),
            compute_environments,
        }
    } else {
        WaitReason::InsufficientCapacity {
            needs,
            nodes,
            requirements: String::new(),
            compute_environments,
        }
    }
}

/// The labels and GPU model `job` requires, as ` with k=v, GPU model M` (or empty).
pub(crate) fn requirements(job: &muster_core::Job) -> String {
    let mut requirements: Vec<String> = job
        .required_labels()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if let Some(model) = job.required_gpu_model() {
        requirements.push(format!("GPU model {model}"));
    }
    if requirements.is_empty() {
        String::new()
    } else {
        format!(" with {}", requirements.join(", "))
    }
}

/// The plan applier's re-check: keeps the placements that still hold against `state` (job
/// still RUNNABLE, node ready and in the queue's compute environments, capacity free counting
/// the placements kept before it) and drops the rest. The nodes of a multi-node job are kept
/// or dropped together.
pub fn verify(state: &State, plan: Plan) -> Plan {
    let mut used = Used::default();
    let mut seen_jobs = BTreeSet::new();
    let mut kept = Vec::with_capacity(plan.placements.len());
    let mut placements = plan.placements.into_iter().peekable();
    while let Some(p) = placements.next() {
        let gang_of = |p: &Placement| {
            state
                .job(&p.job)
                .and_then(|j| j.gang_node())
                .map(|(parent, _, _)| parent)
        };
        let Some(parent) = gang_of(&p) else {
            if state.placement_conflict(&p).is_none()
                && !seen_jobs.contains(&p.job)
                && used.take(state, &p)
            {
                seen_jobs.insert(p.job.clone());
                kept.push(p);
            }
            continue;
        };
        let mut members = vec![p];
        while let Some(next) = placements.next_if(|n| gang_of(n).as_ref() == Some(&parent)) {
            members.push(next);
        }
        if state.gang_conflict(&parent, &members).is_some()
            || members.iter().any(|m| seen_jobs.contains(&m.job))
        {
            continue;
        }
        let mut tentative = used.clone();
        if members.iter().all(|m| tentative.take(state, m)) {
            used = tentative;
            seen_jobs.extend(members.iter().map(|m| m.job.clone()));
            kept.extend(members);
        }
    }
    Plan {
        placements: kept,
        unplaced: plan.unplaced,
    }
}

/// What the placements kept so far take of each node.
#[derive(Clone, Default)]
struct Used {
    resources: BTreeMap<NodeId, Resources>,
    gpus: BTreeSet<(NodeId, u32)>,
}

impl Used {
    /// Takes `p`'s needs if they still fit beside what was taken; says whether they did.
    fn take(&mut self, state: &State, p: &Placement) -> bool {
        let (Some(job), Some(node)) = (state.job(&p.job), state.node(&p.node)) else {
            return false;
        };
        let need = job.spec.container.resources();
        let already = self.resources.get(&p.node).copied().unwrap_or_default();
        if !(already + need).fits_in(&node.free()) {
            return false;
        }
        if p.gpus
            .iter()
            .any(|g| self.gpus.contains(&(p.node.clone(), *g)))
        {
            return false;
        }
        self.resources.insert(p.node.clone(), already + need);
        self.gpus
            .extend(p.gpus.iter().map(|g| (p.node.clone(), *g)));
        true
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod gang_tests;

#[cfg(test)]
mod test_support;
