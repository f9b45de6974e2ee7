//! Backfill: the job at the head of a queue that does not fit now holds a reservation on the
//! node where it will fit soonest, and later jobs run around it only where they cannot delay
//! it, as Slurm's backfill does. Attempt timeouts are the only runtime bounds Muster knows: a
//! job without one is assumed to run forever, so it never backfills into reserved room.

use crate::pool::{Pool, Room};
use muster_core::{Job, NodeId, Resources, State, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// Room held for a waiting job on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub job: muster_core::JobId,
    pub node: NodeId,
    /// When the node will have room for the job (milliseconds), given the timeouts of what
    /// runs there; `None` when that depends on jobs without a timeout.
    pub starts_at: Option<u64>,
    /// What the node will still have free at `starts_at` beyond the reserved job's needs:
    /// the most that jobs running past `starts_at` may still take.
    pub spare: Resources,
}

#[derive(Debug, Default)]
pub(crate) struct Reservations {
    by_node: BTreeMap<NodeId, Vec<Reservation>>,
}

/// When a job placed at `now` ends at the latest: its attempt timeout, if it has one.
pub(crate) fn ends_by(job: &Job, now: Timestamp) -> Option<u64> {
    job.spec
        .timeout_secs
        .map(|t| now.as_millis().saturating_add(t.saturating_mul(1000)))
}

impl Reservations {
    /// True when placing a job needing `need` and ending by `ends_by` on `node` now delays
    /// none of the node's reservations.
    pub fn permits(&self, node: &NodeId, need: &Resources, ends_by: Option<u64>) -> bool {
        self.by_node.get(node).is_none_or(|held| {
            held.iter()
                .all(|r| ends_before(ends_by, r.starts_at) || need.fits_in(&r.spare))
        })
    }

    /// Records a job placed on `node`: it takes from the spare room of every reservation it
    /// may outlive.
    pub fn charge(&mut self, node: &NodeId, need: &Resources, ends_by: Option<u64>) {
        for r in self.by_node.get_mut(node).into_iter().flatten() {
            if !ends_before(ends_by, r.starts_at) {
                r.spare = r.spare.saturating_sub(need);
            }
        }
    }

    /// Reserves room for `job` on the node of `ces` where it will fit soonest (then with the
    /// least left over), if any node it could ever fit on exists.
    pub fn reserve(
        &mut self,
        state: &State,
        pool: &Pool,
        job: &Job,
        ces: &[String],
        now: Timestamp,
    ) -> Option<Reservation> {
        self.reserve_except(state, pool, job, ces, now, &BTreeSet::new())
    }

    /// Reserves room for every node of a multi-node job, each on a node of its own where it
    /// fits soonest; nothing when the nodes it could fit on are too few. The nodes of one
    /// range (one spec) are ranked together, the range with the fewest candidates first. A
    /// gang that its `muster:topology` bound keeps to one domain of a level reserves in the
    /// domain of that level where it can start soonest, so that the nodes held for it are ones
    /// it can start on together. The reservation returned is the one that frees last: the
    /// job's planned start.
    pub fn reserve_gang(
        &mut self,
        state: &State,
        pool: &Pool,
        parent: &Job,
        nodes: &[&Job],
        ces: &[String],
        now: Timestamp,
    ) -> Option<Reservation> {
        let groups = crate::gang::groups(nodes);
        let mut ranked: Vec<(Vec<Ranked>, &Vec<usize>)> = groups
            .iter()
            .map(|(job, members)| (rank(state, pool, job, ces, now), members))
            .collect();
        ranked.sort_by_key(|(rooms, _)| rooms.len());
        let made = match crate::gang::confined_to(parent, now) {
            None => reserve_workers(nodes, &ranked),
            Some(level) => {
                // Each group's ranking split by domain, in rank order.
                let domain_of: BTreeMap<&NodeId, _> = ces
                    .iter()
                    .flat_map(|ce| pool.rooms_in(ce))
                    .filter_map(|room| Some((&room.node.id, crate::gang::domain_at(room, &level)?)))
                    .collect();
                let mut by_domain: BTreeMap<_, Vec<(Vec<Ranked>, &Vec<usize>)>> = BTreeMap::new();
                for (g, (rooms, _)) in ranked.iter().enumerate() {
                    for room in rooms {
                        let Some(domain) = domain_of.get(room.0.3) else {
                            continue;
                        };
                        let lists = by_domain.entry(*domain).or_insert_with(|| {
                            ranked.iter().map(|(_, m)| (Vec::new(), *m)).collect()
                        });
                        lists[g].0.push(*room);
                    }
                }
                by_domain
                    .values()
                    .filter_map(|lists| reserve_workers(nodes, lists))
                    .min_by_key(|made| planned_start(made))
            }
        }?;
        for r in &made {
            self.by_node
                .entry(r.node.clone())
                .or_default()
                .push(r.clone());
        }
        made.into_iter()
            .max_by_key(|r| planned_start(std::slice::from_ref(r)))
    }

    fn reserve_except(
        &mut self,
        state: &State,
        pool: &Pool,
        job: &Job,
        ces: &[String],
        now: Timestamp,
        taken: &BTreeSet<&NodeId>,
    ) -> Option<Reservation> {
        let need = job.spec.container.resources();
        let ((_, _, _, node), starts_at, free) = rank(state, pool, job, ces, now)
            .into_iter()
            .find(|(key, _, _)| !taken.contains(key.3))?;
        let reservation = Reservation {
            job: job.id.clone(),
            node: node.clone(),
            starts_at,
            spare: free.saturating_sub(&need),
        };
        self.by_node
            .entry(reservation.node.clone())
            .or_default()
            .push(reservation.clone());
        Some(reservation)
    }
}

/// A worker of its own for each node of a gang, from each group's ranking (scarcest group
/// first, each node where it fits soonest); `None` when some group runs out of workers.
fn reserve_workers(
    nodes: &[&Job],
    ranked: &[(Vec<Ranked>, &Vec<usize>)],
) -> Option<Vec<Reservation>> {
    let mut taken: BTreeSet<&NodeId> = BTreeSet::new();
    let mut made: Vec<Reservation> = Vec::new();
    for (rooms, members) in ranked {
        let picks: Vec<&Ranked> = rooms
            .iter()
            .filter(|(key, _, _)| !taken.contains(key.3))
            .take(members.len())
            .collect();
        if picks.len() < members.len() {
            return None;
        }
        for (&index, ((_, _, _, node), starts_at, free)) in members.iter().zip(picks) {
            taken.insert(node);
            let need = nodes[index].spec.container.resources();
            made.push(Reservation {
                job: nodes[index].id.clone(),
                node: (*node).clone(),
                starts_at: *starts_at,
                spare: free.saturating_sub(&need),
            });
        }
    }
    Some(made)
}

/// When a gang holding these reservations can start: when the last of them frees (never,
/// ranked last, when one depends on jobs without a timeout).
fn planned_start(made: &[Reservation]) -> (bool, Option<u64>) {
    made.iter()
        .map(|r| (r.starts_at.is_none(), r.starts_at))
        .max()
        .unwrap_or((false, None))
}

/// Every node of `ces` that `job` could ever fit on, best first, with when the job could
/// start there and what is free then.
fn rank<'s>(
    state: &State,
    pool: &Pool<'s>,
    job: &Job,
    ces: &[String],
    now: Timestamp,
) -> Vec<Ranked<'s>> {
    let need = job.spec.container.resources();
    let mut ranked = Vec::new();
    for room in ces.iter().flat_map(|ce| pool.rooms_in(ce)) {
        let node = room.node;
        if !need.fits_in(&node.inventory.capacity) || !node.satisfies(job) {
            continue;
        }
        // All the node will ever have free while its jobs without a timeout run: what is
        // free now plus what every job with a timeout holds.
        let bounded = room
            .placed
            .iter()
            .filter(|(_, end)| end.is_some())
            .fold(node.allocated - node.allocated_unbounded, |f, (r, _)| {
                f + *r
            });
        let mut free = room.free + bounded;
        let mut starts_at = None;
        // Only when the job fits once the jobs with a timeout are gone does it matter when
        // they end, and only then are they looked at one by one: a full cluster of jobs
        // without timeouts costs one comparison a node, not a lookup a job.
        if need.fits_in(&free) {
            (starts_at, free) = soonest_fit(state, room, &need, now);
        }
        // Soonest first; then where the job fits at once when that is known, with the
        // least vCPU left over.
        let key = (
            starts_at.unwrap_or(u64::MAX),
            !need.fits_in(&free),
            free.millicpus.saturating_sub(need.millicpus),
            &node.id,
        );
        ranked.push((key, starts_at, free));
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    ranked
}

/// How a node ranks for a reservation (lower is better): when the job could start there,
/// whether it does not fit at once, the vCPU it would leave over, and the node's id.
type Rank<'s> = (u64, bool, u64, &'s NodeId);

/// A node ranked for a reservation, with when the job could start there and what is free then.
type Ranked<'s> = (Rank<'s>, Option<u64>, Resources);

/// When `need` fits on `room`'s node as its jobs with a timeout end (soonest first), and what
/// is free then. The caller knows it fits once they have all ended.
fn soonest_fit(
    state: &State,
    room: &Room,
    need: &Resources,
    now: Timestamp,
) -> (Option<u64>, Resources) {
    let mut leaving: Vec<(u64, Resources)> = room
        .node
        .placed_jobs
        .iter()
        .filter_map(|id| state.job(id))
        .filter_map(|j| Some((running_ends_by(j, now)?, j.spec.container.resources())))
        .chain(
            room.placed
                .iter()
                .filter_map(|(r, end)| Some(((*end)?, *r))),
        )
        .collect();
    leaving.sort_by_key(|(end, _)| *end);
    let mut free = room.free;
    let mut starts_at = now.as_millis();
    for (end, resources) in leaving {
        if need.fits_in(&free) {
            break;
        }
        free = free + resources;
        starts_at = end;
    }
    (Some(starts_at), free)
}

/// A job that ends by `ends_by` is gone before a reservation starting at `starts_at`.
fn ends_before(ends_by: Option<u64>, starts_at: Option<u64>) -> bool {
    match (ends_by, starts_at) {
        (Some(end), Some(start)) => end <= start,
        // The reservation waits on jobs without a timeout: any bounded job ends first.
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// When a placed job's attempt ends at the latest (never before `now`).
fn running_ends_by(job: &Job, now: Timestamp) -> Option<u64> {
    let active = job.active.as_ref()?;
    let since = active.started_at.unwrap_or(active.placed_at).as_millis();
    job.spec
        .timeout_secs
        .map(|t| since.saturating_add(t * 1000).max(now.as_millis()))
}
