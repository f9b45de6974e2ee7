//! Multi-node jobs: every node on a worker of its own, all placed in this round or none.

use crate::pool::{Pool, Room};
use crate::reservations::Reservations;
use crate::{WaitReason, requirements};
use muster_core::{Job, NodeId, Resources, Timestamp};
use std::collections::BTreeMap;

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
    let confined = confined_to(parent, now);
    // A domain may hold a confined gang when it is no wider than the bound's level: its
    // path names that level.
    let within_bound = |domain: Domain| {
        confined
            .as_ref()
            .is_none_or(|level| domain.iter().any(|(l, _)| l == level))
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
            .filter(|(domain, rooms)| rooms.len() >= nodes.len() && within_bound(domain))
            .collect();
        fitting.sort_by_key(|(domain, rooms)| (rooms.len(), *domain));
        for (_, rooms) in fitting {
            if let Some(chosen) = assign(nodes.len(), &groups, &rooms) {
                return Some(chosen);
            }
        }
    }
    if confined.is_some() {
        return None;
    }
    let all: Vec<&Candidate<'_, 's>> = candidates.iter().collect();
    assign(nodes.len(), &groups, &all)
}

/// The topology level one domain of which must hold every node of the gang now, if any: the
/// level of its `muster:topology` bound while the bound is `required`, or `preferred` and
/// not yet waited out (`preferred:<level>` without a wait takes one domain when one has room
/// now, and spreads otherwise).
pub(crate) fn confined_to(parent: &Job, now: Timestamp) -> Option<String> {
    let bound = parent.topology_bound()?;
    let waited_secs = parent.runnable_since.map_or(0, |since| {
        now.as_millis().saturating_sub(since.as_millis()) / 1000
    });
    let confined = bound.required || bound.max_wait_secs.is_some_and(|limit| waited_secs < limit);
    confined.then_some(bound.level)
}

/// The domain of `level` that `room`'s worker is in (its topology path up to that level), if
/// its path names the level.
pub(crate) fn domain_at<'p, 's>(room: &'p Room<'s>, level: &str) -> Option<Domain<'p>> {
    let path = room.topology();
    let depth = path.iter().position(|(l, _)| *l == level)?;
    Some(&path[..=depth])
}

/// Gives each node a worker of its own among `rooms` (each with the groups that fit on it):
/// the group with the fewest workers to choose from first, each node on the worker it fits
/// tightest. Where that order leaves nodes without a worker although some assignment would
/// give every node one (ranges competing for the same scarce workers), augmenting paths
/// between the ranges find it, so a gang that fits is never left waiting for a round that
/// would decide the same.
fn assign<'s>(
    count: usize,
    groups: &[(&Job, Vec<usize>)],
    rooms: &[&Candidate<'_, 's>],
) -> Option<Vec<&'s NodeId>> {
    // The group each worker holds a node of, and how many more each group needs.
    let mut holder: Vec<Option<usize>> = vec![None; rooms.len()];
    let mut wanting: Vec<usize> = groups.iter().map(|(_, members)| members.len()).collect();
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| {
        let choices = rooms.iter().filter(|(_, fits)| fits[g]).count();
        (choices, g)
    });
    for &g in &order {
        let mut fitting: Vec<usize> = (0..rooms.len())
            .filter(|&r| rooms[r].1[g] && holder[r].is_none())
            .collect();
        fitting.sort_by_key(|&r| tightness(rooms[r].0));
        for r in fitting.into_iter().take(wanting[g]) {
            holder[r] = Some(g);
            wanting[g] -= 1;
        }
    }
    let mut budget = MATCHING_BUDGET;
    while wanting.iter().any(|&w| w > 0) {
        if !augment(&mut holder, &mut wanting, rooms, &mut budget) {
            return None;
        }
    }
    // Each group's nodes on its workers, tightest first.
    let mut chosen: Vec<Option<&'s NodeId>> = vec![None; count];
    for (g, (_, members)) in groups.iter().enumerate() {
        let mut held: Vec<usize> = (0..rooms.len()).filter(|&r| holder[r] == Some(g)).collect();
        held.sort_by_key(|&r| tightness(rooms[r].0));
        for (&index, r) in members.iter().zip(held) {
            chosen[index] = Some(&rooms[r].0.node.id);
        }
    }
    chosen.into_iter().collect()
}

/// How tightly a node fits on a worker: least left free first.
fn tightness<'r>(room: &'r Room<'_>) -> (u64, u64, &'r NodeId) {
    (room.free.millicpus, room.free.memory_mib, &room.node.id)
}

/// Worker checks the augmenting searches of one gang may make before it waits for another
/// round: each search looks at every worker at most once a group, and a gang needs one
/// search a node the greedy pass left without a worker.
const MATCHING_BUDGET: usize = 4_000_000;

/// One augmenting path: a group still wanting a worker takes a free one it fits, directly or
/// by moving nodes of other groups along a chain of workers they also fit (a breadth-first
/// search over the groups, so each is expanded once). False when there is none, or the
/// budget ran out.
fn augment(
    holder: &mut [Option<usize>],
    wanting: &mut [usize],
    rooms: &[&Candidate<'_, '_>],
    budget: &mut usize,
) -> bool {
    let groups = wanting.len();
    // How each group and worker was reached: the worker a group gives up, the group that
    // takes a worker.
    let mut via_worker: Vec<Option<usize>> = vec![None; groups];
    let mut via_group: Vec<Option<usize>> = vec![None; rooms.len()];
    let mut reached: Vec<bool> = (0..groups).map(|g| wanting[g] > 0).collect();
    let mut queue: std::collections::VecDeque<usize> =
        (0..groups).filter(|&g| wanting[g] > 0).collect();
    while let Some(g) = queue.pop_front() {
        for r in 0..rooms.len() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            if !rooms[r].1[g] || holder[r] == Some(g) || via_group[r].is_some() {
                continue;
            }
            via_group[r] = Some(g);
            match holder[r] {
                None => {
                    // Free: each group on the path takes the worker after it and gives up the
                    // one it was reached through.
                    let mut worker = r;
                    loop {
                        let taker = via_group[worker].expect("reached through a group");
                        holder[worker] = Some(taker);
                        match via_worker[taker] {
                            Some(given_up) => worker = given_up,
                            None => {
                                wanting[taker] -= 1;
                                return true;
                            }
                        }
                    }
                }
                Some(other) if !reached[other] => {
                    reached[other] = true;
                    via_worker[other] = Some(r);
                    queue.push_back(other);
                }
                Some(_) => {}
            }
        }
    }
    false
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
