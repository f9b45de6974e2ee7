//! The leader's scheduling loop and plan applier.
//!
//! Woken by every applied batch (and a tick), the loop plans on a snapshot of the state with
//! the pure planner, re-checks the plan against the newest state (the plan applier), and
//! proposes what still holds as one `Place` command. Only the leader proposes: a follower's
//! loop idles, and a deposed leader's proposal is refused by Raft rather than forwarded.

use muster_core::Command;
use muster_raft::RaftNode;
use muster_sched::{PlanConfig, plan, verify};
use std::time::Duration;
use tokio::sync::watch;

/// How often the loop looks even when nothing was applied (a safety net, not the trigger).
const TICK: Duration = Duration::from_millis(500);

pub async fn run(node: RaftNode, config: PlanConfig, mut shutdown: watch::Receiver<bool>) {
    let mut applied = node.state.applied_index();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let (leader, term) = node.leader();
        if leader != Some(node.id) {
            continue;
        }
        round(&node, &config, term).await;
    }
}

/// One scheduling round: plan, re-check, propose.
async fn round(node: &RaftNode, config: &PlanConfig, term: u64) {
    let started = std::time::Instant::now();
    let planned = plan(&node.state.read().state, config);
    if planned.placements.is_empty() {
        return;
    }
    let checked = verify(&node.state.read().state, planned);
    if checked.placements.is_empty() {
        return;
    }
    let count = checked.placements.len();
    let command = Command::Place {
        term,
        at: crate::now_millis(),
        placements: checked.placements,
    };
    // Proposed on this node's Raft only: if leadership moved meanwhile, the write fails here
    // instead of being forwarded, and the new leader plans for itself.
    match node.raft.client_write(command).await {
        Ok(written) => {
            metrics::counter!("muster_scheduler_placements_total").increment(count as u64);
            metrics::histogram!("muster_scheduler_round_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(count, outcome = ?written.data, "placements committed");
        }
        Err(e) => tracing::debug!(error = %e, "placement proposal not committed"),
    }
}
