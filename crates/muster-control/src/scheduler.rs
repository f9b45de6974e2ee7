//! The leader's scheduling loop and plan applier.
//!
//! Woken by every applied batch (and a tick), the loop plans on a snapshot of the state with
//! the pure planner, re-checks the plan against the newest state (the plan applier), and
//! proposes what still holds as one `Place` command. Only the leader proposes: a follower's
//! loop idles, and a deposed leader's proposal is refused by Raft rather than forwarded.

use muster_core::{Command, JobId, State, Timestamp};
use muster_raft::RaftNode;
use muster_sched::{PlanConfig, Unplaced, WaitReason, plan, verify};
use std::time::Duration;
use tokio::sync::watch;

/// How often the loop looks even when nothing was applied (a safety net, not the trigger).
const TICK: Duration = Duration::from_millis(500);

/// Least time between two rounds. Every applied entry wakes the loop, and a round costs time
/// in the number of nodes; under a stream of submits, back-to-back rounds would take a core
/// while placing nothing new. Whatever arrives meanwhile is placed by the next round.
const ROUND_GAP: Duration = Duration::from_millis(5);

/// How often waiting jobs' `statusReason`s are brought up to date. Positions in a queue
/// change with every placement; rewriting them on every round would multiply the log.
const REASONS_EVERY: Duration = Duration::from_secs(2);

pub async fn run(node: RaftNode, config: PlanConfig, mut shutdown: watch::Receiver<bool>) {
    let mut applied = node.state.applied_index();
    let mut reasons_written = tokio::time::Instant::now() - REASONS_EVERY;
    // The state's placement epoch and term the last round planned on. An entry that moved
    // neither (an attempt reported RUNNING, the commonest under load) gives a round nothing
    // new to place, and with a full cluster and a long queue a round is not cheap: the head
    // job's reservation looks at every node.
    // Time-based decisions (queue time limits, wait reasons) still need a round every TICK.
    let mut planned_on = None;
    let mut last_round = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        let ticked = last_round.elapsed() >= TICK;
        if *shutdown.borrow() {
            return;
        }
        let (leader, term) = node.leader();
        if leader != Some(node.id) {
            planned_on = None;
            continue;
        }
        let epoch = (node.state.read().state.placement_epoch(), term);
        if !ticked && planned_on == Some(epoch) {
            continue;
        }
        planned_on = Some(epoch);
        last_round = tokio::time::Instant::now();
        let refresh = reasons_written.elapsed() >= REASONS_EVERY;
        if refresh {
            reasons_written = tokio::time::Instant::now();
        }
        round(&node, &config, term, refresh).await;
        tokio::time::sleep(ROUND_GAP).await;
    }
}

/// One scheduling round: plan, re-check, propose; and cancel the jobs that have waited in
/// RUNNABLE longer than their queue's `jobStateTimeLimitActions` allow.
async fn round(node: &RaftNode, config: &PlanConfig, term: u64, refresh_reasons: bool) {
    let started = tokio::time::Instant::now();
    let now = crate::now_millis();
    let (planned, expired, reasons, unplaceable) = {
        let applied = node.state.read();
        let planned = plan(&applied.state, config, now);
        let expired = past_time_limits(&applied.state, &planned.unplaced, now);
        let unplaceable: Vec<(JobId, String)> = planned
            .unplaced
            .iter()
            .filter(|u| matches!(u.reason, WaitReason::NeverFits { .. }))
            .map(|u| (u.job.clone(), u.status_reason()))
            .collect();
        let reasons = if refresh_reasons {
            changed_reasons(&applied.state, &planned.unplaced)
        } else {
            Vec::new()
        };
        (planned, expired, reasons, unplaceable)
    };
    // Placements first: nothing else this round writes may hold them up.
    if !planned.placements.is_empty() {
        let checked = verify(&node.state.read().state, planned);
        if !checked.placements.is_empty() {
            let count = checked.placements.len();
            let command = Command::Place {
                term,
                at: now,
                placements: checked.placements,
            };
            // Proposed on this node's Raft only: if leadership moved meanwhile, the write
            // fails here instead of being forwarded, and the new leader plans for itself.
            match node.write_as_leader(command).await {
                Ok(written) => {
                    metrics::counter!("muster_scheduler_placements_total").increment(count as u64);
                    metrics::histogram!("muster_scheduler_round_seconds")
                        .record(started.elapsed().as_secs_f64());
                    tracing::debug!(count, outcome = ?written.data, "placements committed");
                }
                Err(e) => tracing::debug!(error = %e, "placement proposal not committed"),
            }
        }
    }
    // Then, in one entry, the RUNNABLE jobs that end: those no node could ever hold (they fail
    // now rather than wait for capacity that cannot come: workflow engines act on their
    // MISCONFIGURATION reason), and those past their queue's `jobStateTimeLimitActions`.
    let ending: Vec<(JobId, String)> = unplaceable.into_iter().chain(expired).collect();
    if !ending.is_empty()
        && let Err(e) = node
            .write_as_leader(Command::FailUnplaceable {
                jobs: ending,
                at: now,
            })
            .await
    {
        tracing::debug!(error = %e, "ending jobs not committed");
    }
    if !reasons.is_empty()
        && let Err(e) = node
            .write_as_leader(Command::SetWaitReasons { reasons })
            .await
    {
        tracing::debug!(error = %e, "wait reasons not committed");
    }
}

/// The `statusReason` of each unplaced job whose reason changed since it was last written.
fn changed_reasons(state: &State, unplaced: &[Unplaced]) -> Vec<(JobId, String)> {
    unplaced
        .iter()
        .filter_map(|u| {
            let reason = u.status_reason();
            let current = state.job(&u.job)?.status_reason.as_deref();
            (current != Some(reason.as_str())).then(|| (u.job.clone(), reason))
        })
        .collect()
}

/// Unplaced jobs whose wait matches one of their queue's `jobStateTimeLimitActions` and has
/// lasted at least its `maxTimeSeconds`, with the action's reason.
fn past_time_limits(state: &State, unplaced: &[Unplaced], now: Timestamp) -> Vec<(JobId, String)> {
    let mut out = Vec::new();
    for u in unplaced {
        let Some(job) = state.job(&u.job) else {
            continue;
        };
        let Some(queue) = state.queue(&job.spec.queue) else {
            continue;
        };
        let waited_ms = now
            .as_millis()
            .saturating_sub(job.runnable_since.unwrap_or(job.created_at).as_millis());
        let hit = queue
            .time_limit_actions
            .iter()
            .find(|a| a.reason == u.reason.category() && waited_ms >= a.max_time_seconds * 1000);
        if let Some(action) = hit {
            out.push((job.id.clone(), action.reason.clone()));
        }
    }
    out
}
