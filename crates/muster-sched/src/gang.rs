//! Multi-node jobs: every node on a worker of its own, all placed in this round or none.

use crate::pool::Pool;
use crate::reservations::Reservations;
use crate::{WaitReason, requirements};
use muster_core::{Job, NodeId, Resources};
use std::collections::BTreeSet;

/// A distinct worker for each of `nodes` (a multi-node job's node jobs, in index order), or
/// `None` when not all of them fit now.
pub(crate) fn find<'s>(
    pool: &Pool<'s>,
    nodes: &[&Job],
    ces: &[String],
    reservations: &Reservations,
    ends_by: Option<u64>,
) -> Option<Vec<&'s NodeId>> {
    let mut taken: BTreeSet<&NodeId> = BTreeSet::new();
    let mut chosen = Vec::with_capacity(nodes.len());
    for node_job in nodes {
        let worker = pool.find_except(node_job, ces, reservations, ends_by, &taken)?;
        taken.insert(worker);
        chosen.push(worker);
    }
    Some(chosen)
}

/// Why a multi-node job was not placed: no ready worker, too few workers that could ever hold
/// its nodes (each needs one of its own), or not enough free now.
pub(crate) fn why_unplaced(pool: &Pool, nodes: &[&Job], ces: &[String]) -> WaitReason {
    let count = nodes.len() as u32;
    // The largest node's needs, for the message.
    let needs = nodes
        .iter()
        .map(|n| n.spec.container.resources())
        .fold(Resources::ZERO, |a, b| Resources {
            millicpus: a.millicpus.max(b.millicpus),
            memory_mib: a.memory_mib.max(b.memory_mib),
            gpus: a.gpus.max(b.gpus),
        });
    let compute_environments = ces.to_vec();
    if !pool.has_ready_node(ces) {
        return WaitReason::NoNodes {
            compute_environments,
        };
    }
    // Each node needs a worker that could hold it, and the job as many such workers as it
    // has nodes (a necessary condition: it never calls a job that could run unplaceable).
    let workers = pool.nodes_that_could_hold_any(nodes, ces);
    let any_node_fits_nowhere = nodes.iter().any(|n| !pool.could_ever_hold(n, ces));
    if any_node_fits_nowhere || workers < nodes.len() {
        return WaitReason::NeverFits {
            needs,
            nodes: count,
            requirements: nodes.first().map(|n| requirements(n)).unwrap_or_default(),
            compute_environments,
        };
    }
    WaitReason::InsufficientCapacity {
        needs,
        nodes: count,
        compute_environments,
    }
}
