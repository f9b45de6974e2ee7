//! Free capacity as a plan consumes it, indexed so that finding a node costs a range lookup
//! instead of a scan of every node.

use crate::reservations::Reservations;
use muster_core::{EnabledState, Job, Node, NodeId, Resources, State};
use std::collections::{BTreeMap, BTreeSet};

pub use muster_core::ALLOCATION_STRATEGY_TAG;

/// How a compute environment chooses among the nodes a job fits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationStrategy {
    /// The node left with the least free vCPU, then memory: packs nodes, keeps big holes.
    BestFit,
    /// The node with the most free vCPU, then memory: spreads load across nodes.
    Spread,
}

static NO_NODE: NodeId = NodeId(String::new());

/// A ready node and what this plan has left of it.
pub(crate) struct Room<'s> {
    pub node: &'s Node,
    pub free: Resources,
    /// GPU indices this plan has handed out.
    pub gpus_taken: BTreeSet<u32>,
    /// Jobs this plan placed here, with when they end at the latest (`None`: no timeout).
    pub placed: Vec<(Resources, Option<u64>)>,
    /// The node's topology path, read from its labels when a gang first asks.
    topology: std::cell::OnceCell<Vec<(&'s str, &'s str)>>,
    /// It runs, or this plan gives it, a node of a multi-node job: no other goes here.
    gang_here: bool,
}

impl<'s> Room<'s> {
    /// Where the node sits in the network, widest level first (see `Node::topology`).
    pub fn topology(&self) -> &[(&'s str, &'s str)] {
        self.topology.get_or_init(|| self.node.topology())
    }
}

/// What a node of a compute environment could hold when empty, for "can this job ever
/// run here?". Nodes with equal shapes are kept once, so a uniform fleet is one entry.
#[derive(PartialEq)]
struct Shape<'s> {
    capacity: Resources,
    labels: &'s BTreeMap<String, String>,
    gpu_models: BTreeMap<&'s str, u32>,
}

impl Shape<'_> {
    fn could_hold(&self, job: &Job) -> bool {
        let need = job.spec.container.resources();
        need.fits_in(&self.capacity)
            && job
                .required_labels()
                .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
            && job
                .required_gpu_model()
                .is_none_or(|m| self.gpu_models.get(m).copied().unwrap_or(0) >= need.gpus)
            && job.spec.fabric.is_none_or(|f| f.offered_by(self.labels))
    }
}

pub(crate) struct Pool<'s> {
    rooms: BTreeMap<&'s NodeId, Room<'s>>,
    /// Ready nodes of each enabled compute environment by (free millicpus, free memory).
    by_free: BTreeMap<&'s str, BTreeSet<(u64, u64, &'s NodeId)>>,
    /// Every registered node's shape (lost ones too: they may come back), per environment,
    /// with how many nodes have it.
    shapes: BTreeMap<&'s str, Vec<(Shape<'s>, usize)>>,
    strategies: BTreeMap<&'s str, AllocationStrategy>,
    /// Every registered node of the wanted environments (lost ones too), for questions about
    /// what could ever run.
    registered: BTreeMap<&'s str, Vec<&'s Node>>,
}

impl<'s> Pool<'s> {
    /// The pool of the compute environments in `wanted`; nodes of the others are not looked
    /// at (a round pays for the environments someone is waiting on, not for the fleet).
    pub fn new(state: &'s State, wanted: &BTreeSet<&str>) -> Self {
        let mut pool = Pool {
            rooms: BTreeMap::new(),
            by_free: BTreeMap::new(),
            shapes: BTreeMap::new(),
            strategies: BTreeMap::new(),
            registered: BTreeMap::new(),
        };
        let mut enabled = BTreeSet::new();
        for ce in state.compute_environments() {
            let strategy = match ce.tags.get(ALLOCATION_STRATEGY_TAG).map(String::as_str) {
                Some("SPREAD") => AllocationStrategy::Spread,
                _ => AllocationStrategy::BestFit,
            };
            pool.strategies.insert(ce.name.as_str(), strategy);
            if ce.state == EnabledState::Enabled {
                enabled.insert(ce.name.as_str());
            }
        }
        for node in state.nodes() {
            let ce = node.compute_environment.as_str();
            if !wanted.contains(ce) {
                continue;
            }
            let mut gpu_models: BTreeMap<&str, u32> = BTreeMap::new();
            for g in &node.inventory.gpus {
                *gpu_models.entry(g.model.as_str()).or_default() += 1;
            }
            let shape = Shape {
                capacity: node.inventory.capacity,
                labels: &node.inventory.labels,
                gpu_models,
            };
            pool.registered.entry(ce).or_default().push(node);
            let shapes = pool.shapes.entry(ce).or_default();
            match shapes.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, count)) => *count += 1,
                None => shapes.push((shape, 1)),
            }
            if !node.accepts_work() || !enabled.contains(ce) {
                continue;
            }
            let free = node.free();
            pool.by_free
                .entry(ce)
                .or_default()
                .insert((free.millicpus, free.memory_mib, &node.id));
            pool.rooms.insert(
                &node.id,
                Room {
                    node,
                    free,
                    gpus_taken: BTreeSet::new(),
                    placed: Vec::new(),
                    topology: std::cell::OnceCell::new(),
                    gang_here: node.gang_nodes > 0,
                },
            );
        }
        pool
    }

    pub fn rooms_in<'p>(&'p self, ce: &'p str) -> impl Iterator<Item = &'p Room<'s>> + 'p {
        self.by_free
            .get(ce)
            .into_iter()
            .flatten()
            .filter_map(|(_, _, id)| self.rooms.get(id))
    }

    /// True when some ready node of `ces` exists.
    pub fn has_ready_node(&self, ces: &[String]) -> bool {
        ces.iter()
            .any(|ce| self.by_free.get(ce.as_str()).is_some_and(|s| !s.is_empty()))
    }

    /// True when some registered node of `ces`, empty, could hold `job`.
    pub fn could_ever_hold(&self, job: &Job, ces: &[String]) -> bool {
        self.nodes_that_could_hold(job, ces) > 0
    }

    /// How many registered nodes of `ces`, empty, could hold `job`.
    pub fn nodes_that_could_hold(&self, job: &Job, ces: &[String]) -> usize {
        self.nodes_that_could_hold_any(&[job], ces)
    }

    /// How many registered nodes of `ces`, empty, could hold at least one of `jobs`.
    pub fn nodes_that_could_hold_any(&self, jobs: &[&Job], ces: &[String]) -> usize {
        ces.iter()
            .filter_map(|ce| self.shapes.get(ce.as_str()))
            .flatten()
            .filter(|(s, _)| jobs.iter().any(|job| s.could_hold(job)))
            .map(|(_, count)| count)
            .sum()
    }

    /// Every registered node of `ces`, ready or not.
    pub fn registered_in<'p>(&'p self, ces: &'p [String]) -> impl Iterator<Item = &'s Node> + 'p {
        ces.iter()
            .filter_map(|ce| self.registered.get(ce.as_str()))
            .flatten()
            .copied()
    }

    /// Sum of capacity and of free vCPU of the ready nodes of `ces`, in millicpus.
    pub fn millicpus(&self, ces: &[String]) -> (u64, u64) {
        ces.iter()
            .flat_map(|ce| self.rooms_in(ce))
            .fold((0, 0), |(cap, free), r| {
                (
                    cap + r.node.inventory.capacity.millicpus,
                    free + r.free.millicpus,
                )
            })
    }

    /// The node `job` goes to: in the first of `ces` (queue order) with a node it fits on
    /// now without delaying a reservation, chosen by that environment's strategy.
    pub fn find(
        &self,
        job: &Job,
        ces: &[String],
        reservations: &Reservations,
        ends_by: Option<u64>,
    ) -> Option<&'s NodeId> {
        self.find_except(job, ces, reservations, ends_by, &BTreeSet::new())
    }

    /// As [`Self::find`], among the nodes not in `taken`.
    pub fn find_except(
        &self,
        job: &Job,
        ces: &[String],
        reservations: &Reservations,
        ends_by: Option<u64>,
        taken: &BTreeSet<&NodeId>,
    ) -> Option<&'s NodeId> {
        let need = job.spec.container.resources();
        let fits =
            |id: &NodeId| !taken.contains(id) && self.fits_on(id, job, reservations, ends_by);
        ces.iter().find_map(|ce| {
            let index = self.by_free.get(ce.as_str())?;
            let from = (need.millicpus, 0, &NO_NODE);
            match self.strategies.get(ce.as_str()) {
                Some(AllocationStrategy::Spread) => index
                    .range(from..)
                    .rev()
                    .find(|(_, memory, id)| *memory >= need.memory_mib && fits(id)),
                _ => index
                    .range(from..)
                    .find(|(_, memory, id)| *memory >= need.memory_mib && fits(id)),
            }
            .map(|(_, _, id)| *id)
        })
    }

    /// Whether `job` fits on the ready node `id` now (room, labels, GPUs) without delaying a
    /// reservation there.
    pub fn fits_on(
        &self,
        id: &NodeId,
        job: &Job,
        reservations: &Reservations,
        ends_by: Option<u64>,
    ) -> bool {
        let Some(room) = self.rooms.get(id) else {
            return false;
        };
        let need = job.spec.container.resources();
        need.fits_in(&room.free)
            && !(room.gang_here && job.gang_node().is_some())
            && room.node.satisfies(job)
            && self.free_gpus(room, job).take(need.gpus as usize).count() == need.gpus as usize
            && reservations.permits(id, &need, ends_by)
    }

    fn free_gpus<'a>(&'a self, room: &'a Room<'s>, job: &'a Job) -> impl Iterator<Item = u32> + 'a {
        room.node
            .free_gpus_for(job)
            .filter(|i| !room.gpus_taken.contains(i))
    }

    /// Takes `job`'s resources on `node` and returns the GPU indices it gets.
    pub fn take(&mut self, node: &'s NodeId, job: &Job, ends_by: Option<u64>) -> Vec<u32> {
        let need = job.spec.container.resources();
        let room = &self.rooms[node];
        let free: Vec<u32> = self.free_gpus(room, job).collect();
        let gpus = choose_gpus(&free, need.gpus as usize, &room.node.inventory.gpus);
        let ce = room.node.compute_environment.as_str();
        let room = self.rooms.get_mut(node).expect("taken from a known room");
        if let Some(index) = self.by_free.get_mut(ce) {
            index.remove(&(room.free.millicpus, room.free.memory_mib, node));
            room.free = room.free.saturating_sub(&need);
            index.insert((room.free.millicpus, room.free.memory_mib, node));
        }
        room.gpus_taken.extend(gpus.iter().copied());
        room.placed.push((need, ends_by));
        room.gang_here |= job.gang_node().is_some();
        gpus
    }
}

/// Which `count` of the `free` GPU indices (ascending) a job gets: the lowest-numbered set in
/// which every GPU reaches every other over NVLink, when the node has one (a job spread over
/// GPUs that talk through PCIe runs its collectives at a fraction of the speed); otherwise the
/// lowest `count` indices.
fn choose_gpus(free: &[u32], count: usize, devices: &[muster_core::GpuDevice]) -> Vec<u32> {
    let linked = |a: u32, b: u32| {
        devices
            .iter()
            .any(|g| g.index == a && g.nvlink_peers.contains(&b))
    };
    if count > 1 {
        for (at, &seed) in free.iter().enumerate() {
            let mut set = vec![seed];
            for &next in &free[at + 1..] {
                if set.len() == count {
                    break;
                }
                if set
                    .iter()
                    .all(|&member| linked(member, next) && linked(next, member))
                {
                    set.push(next);
                }
            }
            if set.len() == count {
                return set;
            }
        }
    }
    free.iter().copied().take(count).collect()
}
