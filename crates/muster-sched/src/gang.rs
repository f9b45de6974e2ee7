//! Multi-node jobs: every node on a worker of its own, all placed in this round or none.

use crate::pool::{Pool, Room};
use crate::reservations::Reservations;
use crate::{WaitReason, requirements};
use muster_core::{Job, NodeId, Resources, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// A topology domain: the path to it, widest level first (`[("block","b1"), ("rack","r2")]`).
type Domain<'a> = &'a [(&'a str, &'a str)];

/// A worker that could take some of a gang's nodes, and which of its groups fit there.
type Candidate<'p, 's> = (&'p Room<'s>, Vec<bool>);

/// The nodes of a gang grouped by what they ask for: nodes of one range share one spec, so a
/// gang of a thousand nodes is usually one or two groups, and a worker is judged once a group.
pub(crate) fn groups<'a>(nodes: &[&'a Job]) -> Vec<(&'a Job, Vec<usize>)> {
    let mut groups: Vec<(&Job, Vec<usize>)> = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        match groups
            .iter_mut()
            .find(|(first, _)| std::sync::Arc::ptr_eq(&first.spec, &node.spec))
        {
            Some((_, members)) => members.push(index),
            None => groups.push((node, vec![index])),
        }
    }
    groups
}

/// A distinct worker for each of `nodes` (a multi-node job's node jobs, in index order), or
/// `None` when not all of them fit now. As Slurm's tree topology does, the workers come from
/// the narrowest topology domain that can hold them all (the smallest such domain, then by
/// name), else from the whole pool, unless the parent's `muster:topology` bound keeps them in
/// one domain of its level (`required:<level>`, or `preferred:<level>:<seconds>` until it has
/// waited that long).
pub(crate) fn find<'s>(
    pool: &Pool<'s>,
    parent: &Job,
    nodes: &[&Job],
    ces: &[String],
    reservations: &Reservations,
    now: Timestamp,
) -> Option<Vec<&'s NodeId>> {
    let ends_by = crate::reservations::ends_by(parent, now);
    let groups = groups(nodes);
    // Each worker with the groups whose nodes fit on it now.
    let candidates: Vec<Candidate<'_, 's>> = ces
        .iter()
        .flat_map(|ce| pool.rooms_in(ce))
        .filter_map(|room| {
            let fits: Vec<bool> = groups
                .iter()
                .map(|(job, _)| pool.fits_on(&room.node.id, job, reservations, ends_by))
                .collect();
            fits.contains(&true).then_some((room, fits))
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
        // `preferred:<level>` without a wait takes one domain when one has room now.
        Some(b) => b.max_wait_secs.is_none_or(|limit| waited_secs >= limit),
    };
    // A domain may hold the gang without spreading when it is no wider than the bound's
    // level: its path names that level.
    let within_bound = |domain: Domain| {
        bound
            .as_ref()
            .is_none_or(|b| domain.iter().any(|(level, _)| *level == b.level))
    };
    let depth = candidates
        .iter()
        .map(|(room, _)| room.topology().len())
        .max()
        .unwrap_or(0);
    for level in (0..depth).rev() {
        let mut domains: BTreeMap<Domain, Vec<&Candidate<'_, 's>>> = BTreeMap::new();
        for candidate in &candidates {
            let path = candidate.0.topology();
            if path.len() > level {
                domains.entry(&path[..=level]).or_default().push(candidate);
            }
        }
        let mut fitting: Vec<(Domain, Vec<&Candidate<'_, 's>>)> = domains
            .into_iter()
            .filter(|(domain, rooms)| {
                rooms.len() >= nodes.len() && (may_spread || within_bound(domain))
            })
            .collect();
        fitting.sort_by_key(|(domain, rooms)| (rooms.len(), *domain));
        for (_, rooms) in fitting {
            if let Some(chosen) = assign(nodes.len(), &groups, &rooms) {
                return Some(chosen);
            }
        }
    }
    if !may_spread {
        return None;
    }
    let all: Vec<&Candidate<'_, 's>> = candidates.iter().collect();
    assign(nodes.len(), &groups, &all)
}

/// Gives each node a worker of its own among `rooms` (each with the groups that fit on it):
/// the group with the fewest workers to choose from first, each node on the worker it fits
/// tightest. Greedy, not a full matching: ranges that compete for the same scarce workers
/// in a way this order does not settle wait for another round.
fn assign<'s>(
    count: usize,
    groups: &[(&Job, Vec<usize>)],
    rooms: &[&Candidate<'_, 's>],
) -> Option<Vec<&'s NodeId>> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| {
        let choices = rooms.iter().filter(|(_, fits)| fits[g]).count();
        (choices, g)
    });
    let mut taken: BTreeSet<&NodeId> = BTreeSet::new();
    let mut chosen: Vec<Option<&'s NodeId>> = vec![None; count];
    for g in order {
        let mut fitting: Vec<&Room<'s>> = rooms
            .iter()
            .filter(|(room, fits)| fits[g] && !taken.contains(&room.node.id))
            .map(|(room, _)| *room)
            .collect();
        let members = &groups[g].1;
        if fitting.len() < members.len() {
            return None;
        }
        fitting.sort_by_key(|r| (r.free.millicpus, r.free.memory_mib, &r.node.id));
        for (&index, room) in members.iter().zip(fitting) {
            taken.insert(&room.node.id);
            chosen[index] = Some(&room.node.id);
        }
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
    let groups = groups(nodes);
    // Each range needs as many workers that could hold it as it has nodes.
    let range_too_large = groups
        .iter()
        .any(|(job, members)| pool.nodes_that_could_hold(job, ces) < members.len());
    // Each node needs a worker that could hold it, and the job as many such workers as it
    // has nodes (a necessary condition: it never calls a job that could run unplaceable).
    let representatives: Vec<&Job> = groups.iter().map(|(job, _)| *job).collect();
    let workers = pool.nodes_that_could_hold_any(&representatives, ces);
    let bound = parent.topology_bound();
    let mut wanted = nodes.first().map(|n| requirements(n)).unwrap_or_default();
    if let Some(b) = &bound {
        wanted.push_str(&format!(" in one {}", b.level));
    }
    // A strict bound needs one domain of its level with as many registered workers (ready or
    // not) that could hold a node, empty, as the job has nodes.
    let no_domain_large_enough = bound.as_ref().filter(|b| b.required).is_some_and(|b| {
        let mut per_domain: BTreeMap<Vec<(&str, &str)>, usize> = BTreeMap::new();
        for node in pool.registered_in(ces) {
            let path = node.topology();
            let Some(at) = path.iter().position(|(level, _)| *level == b.level) else {
                continue;
            };
            let could_hold = representatives.iter().any(|n| {
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
        per_domain.values().all(|count| *count < nodes.len())
    });
    if range_too_large || workers < nodes.len() || no_domain_large_enough {
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
