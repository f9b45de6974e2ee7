//! Multi-node jobs: every node on a worker of its own, all placed in this round or none.

use crate::pool::{Pool, Room};
use crate::reservations::Reservations;
use crate::{WaitReason, requirements};
use muster_core::{Job, NodeId, Resources, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// A topology domain: the path to it, widest level first (`[("block","b1"), ("rack","r2")]`).
type Domain<'a> = &'a [(&'a str, &'a str)];

/// A distinct worker for each of `nodes` (a multi-node job's node jobs, in index order), or
/// `None` when not all of them fit now. As Slurm's tree topology does, the workers come from
/// the narrowest topology domain that can hold them all (the smallest such domain, then by
/// name), else from the whole pool, unless the parent's `muster:topology` bound forbids
/// spreading (`required:<level>`, or `preferred:<level>:<seconds>` until it has waited that
/// long).
pub(crate) fn find<'s>(
    pool: &Pool<'s>,
    parent: &Job,
    nodes: &[&Job],
    ces: &[String],
    reservations: &Reservations,
    now: Timestamp,
) -> Option<Vec<&'s NodeId>> {
    let ends_by = crate::reservations::ends_by(parent, now);
    // Workers where at least one of the nodes fits now.
    let candidates: Vec<&Room<'s>> = ces
        .iter()
        .flat_map(|ce| pool.rooms_in(ce))
        .filter(|r| {
            nodes
                .iter()
                .any(|n| pool.fits_on(&r.node.id, n, reservations, ends_by))
        })
        .collect();
    if candidates.len() < nodes.len() {
        return None;
    }
    let bound = parent.topology_bound();
    let waited_secs = parent.runnable_since.map_or(0, |since| {
        now.as_millis().saturating_sub(since.as_millis()) / 1000
    });
    let may_spread = match &bound {
        None => true,
        Some(b) if b.required => false,
        Some(b) => b.max_wait_secs.is_some_and(|limit| waited_secs >= limit),
    };
    let paths: Vec<Vec<(&str, &str)>> = candidates.iter().map(|r| r.node.topology()).collect();
    let depth = paths.iter().map(Vec::len).max().unwrap_or(0);
    // The widest level the bound lets a gang span without spreading.
    let widest = match &bound {
        Some(b) => paths
            .iter()
            .find_map(|p| p.iter().position(|(level, _)| *level == b.level)),
        None => Some(0),
    };
    for level in (0..depth).rev() {
        if widest.is_none_or(|w| level < w) && !may_spread {
            break;
        }
        let mut domains: BTreeMap<Domain, Vec<&Room<'s>>> = BTreeMap::new();
        for (room, path) in candidates.iter().zip(&paths) {
            if path.len() > level {
                domains.entry(&path[..=level]).or_default().push(room);
            }
        }
        let mut fitting: Vec<(Domain, Vec<&Room<'s>>)> = domains
            .into_iter()
            .filter(|(_, rooms)| rooms.len() >= nodes.len())
            .collect();
        fitting.sort_by_key(|(domain, rooms)| (rooms.len(), *domain));
        for (_, rooms) in fitting {
            if let Some(chosen) = assign(pool, nodes, &rooms, reservations, ends_by) {
                return Some(chosen);
            }
        }
    }
    if !may_spread {
        return None;
    }
    assign(pool, nodes, &candidates, reservations, ends_by)
}

/// Gives each node a worker of its own among `rooms`, the most demanding nodes first, each on
/// the worker it fits tightest.
fn assign<'s>(
    pool: &Pool<'s>,
    nodes: &[&Job],
    rooms: &[&Room<'s>],
    reservations: &Reservations,
    ends_by: Option<u64>,
) -> Option<Vec<&'s NodeId>> {
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| {
        let need = nodes[i].spec.container.resources();
        (
            std::cmp::Reverse(need.gpus),
            std::cmp::Reverse(need.millicpus),
            std::cmp::Reverse(need.memory_mib),
            i,
        )
    });
    let mut taken: BTreeSet<&NodeId> = BTreeSet::new();
    let mut chosen: Vec<Option<&'s NodeId>> = vec![None; nodes.len()];
    for i in order {
        let room = rooms
            .iter()
            .filter(|r| !taken.contains(&r.node.id))
            .filter(|r| pool.fits_on(&r.node.id, nodes[i], reservations, ends_by))
            .min_by_key(|r| (r.free.millicpus, r.free.memory_mib, &r.node.id))?;
        taken.insert(&room.node.id);
        chosen[i] = Some(&room.node.id);
    }
    chosen.into_iter().collect()
}

/// Why a multi-node job was not placed: no ready worker, too few workers that could ever hold
/// its nodes (each needs one of its own), or not enough free now.
pub(crate) fn why_unplaced(
    pool: &Pool,
    parent: &Job,
    nodes: &[&Job],
    ces: &[String],
) -> WaitReason {
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
    let bound = parent.topology_bound();
    let mut wanted = nodes.first().map(|n| requirements(n)).unwrap_or_default();
    if let Some(b) = &bound {
        wanted.push_str(&format!(" in one {}", b.level));
    }
    // A strict bound needs one domain of its level with as many registered workers (ready or
    // not) that could hold a node, empty, as the job has nodes.
    let no_domain_large_enough = bound.as_ref().is_some_and(|b| {
        let mut per_domain: BTreeMap<Vec<(&str, &str)>, usize> = BTreeMap::new();
        for node in pool.registered_in(ces) {
            let path = node.topology();
            let Some(at) = path.iter().position(|(level, _)| *level == b.level) else {
                continue;
            };
            let could_hold = nodes.iter().any(|n| {
                n.spec
                    .container
                    .resources()
                    .fits_in(&node.inventory.capacity)
                    && node.satisfies(n)
            });
            if could_hold {
                *per_domain.entry(path[..=at].to_vec()).or_default() += 1;
            }
        }
        b.required && per_domain.values().all(|count| *count < nodes.len())
    });
    if any_node_fits_nowhere || workers < nodes.len() || no_domain_large_enough {
        return WaitReason::NeverFits {
            needs,
            nodes: count,
            requirements: wanted,
            compute_environments,
        };
    }
    WaitReason::InsufficientCapacity {
        needs,
        nodes: count,
        requirements: bound
            .map(|b| format!(" in one {}", b.level))
            .unwrap_or_default(),
        compute_environments,
    }
}
