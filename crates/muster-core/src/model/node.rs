//! Worker nodes as the control plane knows them.

use crate::{JobId, NodeId, Resources, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What an agent reports about its machine when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// What the node offers to jobs (machine capacity less reserved resources).
    pub capacity: Resources,
    pub hostname: String,
    /// The address jobs on this node may be reached at (for multi-node jobs later).
    pub address: String,
    /// `docker` or `process`.
    pub executor: String,
    /// The node's GPUs, in NVML index order; `capacity.gpus` counts them.
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
    /// Free-form labels from the agent's config (`rack`, `topology-domain`, …) that jobs
    /// may require with `muster:node.<label>` tags.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `host:port` of the agent's log service (empty for agents that serve none).
    #[serde(default)]
    pub log_address: String,
}

/// The label carrying a node's topology path, widest level first: `block=b1/rack=r12`.
pub const TOPOLOGY_LABEL: &str = "topology";

/// The label carrying a node's one topology domain (the agent's `topology_domain`).
pub const TOPOLOGY_DOMAIN_LABEL: &str = "topology-domain";

/// One GPU as the agent found it through NVML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    /// Indices of the node's other GPUs this one reaches over NVLink, where NVML tells (peer
    /// to peer over NVLink, directly or through an NVSwitch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvlink_peers: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Ready,
    /// The agent is alive but cannot run jobs (its Docker engine does not answer): nothing is
    /// placed on it until it says it is healthy again.
    Unhealthy,
    Lost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// The compute environment this node serves; a node belongs to exactly one.
    pub compute_environment: String,
    pub inventory: NodeInventory,
    pub status: NodeStatus,
    /// Sum of the resources of jobs placed here (STARTING or RUNNING). Kept by apply so that
    /// the planner and the plan check never recompute it.
    pub allocated: Resources,
    /// The part of `allocated` held by jobs without an attempt timeout: they may never end,
    /// so a reservation never counts on the room they hold, and the planner need not look
    /// at each of them to know it. Derived: rebuilt from the jobs when a state is loaded.
    #[serde(skip)]
    pub allocated_unbounded: Resources,
    /// Jobs whose active attempt is on this node.
    pub placed_jobs: BTreeSet<JobId>,
    /// GPU indices held by those jobs' attempts.
    #[serde(default)]
    pub gpus_in_use: BTreeSet<u32>,
    pub registered_at: Timestamp,
    /// Why the node is `Unhealthy`, as its agent said.
    #[serde(default)]
    pub unhealthy_reason: Option<String>,
    /// An operator drained it (`muster node drain`): nothing new is placed here, while what
    /// runs goes on. Kept across the agent's restarts until undrained.
    #[serde(default)]
    pub draining: bool,
    /// How many nodes of multi-node jobs have an attempt here. Their containers share the
    /// worker's network, so a worker runs at most one (two MPI or torchrun jobs would reach
    /// for the same ports). Derived: rebuilt from the jobs when a state is loaded.
    #[serde(skip)]
    pub gang_nodes: u32,
}

impl Node {
    /// Whether new attempts may be placed here: its agent is healthy and it is not drained.
    pub fn accepts_work(&self) -> bool {
        self.status == NodeStatus::Ready && !self.draining
    }

    pub fn free(&self) -> Resources {
        self.inventory.capacity.saturating_sub(&self.allocated)
    }

    /// True when the node carries every label `job` requires and, if it names a GPU model,
    /// has GPUs of that model.
    pub fn satisfies(&self, job: &crate::Job) -> bool {
        job.required_labels()
            .all(|(k, v)| self.inventory.labels.get(k).is_some_and(|have| have == v))
            && job
                .required_gpu_model()
                .is_none_or(|m| self.inventory.gpus.iter().any(|g| g.model == m))
            && job
                .spec
                .fabric
                .is_none_or(|f| f.offered_by(&self.inventory.labels))
    }

    /// Where the node sits in the network, widest level first: the agent's `topology` path
    /// (`block=b1/rack=r12/switch=s3` in the `topology` label), else its `topology-domain` as
    /// a path of one level; empty when it reported neither.
    pub fn topology(&self) -> Vec<(&str, &str)> {
        if let Some(path) = self.inventory.labels.get(TOPOLOGY_LABEL) {
            return path
                .split('/')
                .filter_map(|level| level.split_once('='))
                .collect();
        }
        self.inventory
            .labels
            .get(TOPOLOGY_DOMAIN_LABEL)
            .map(|domain| vec![(TOPOLOGY_DOMAIN_LABEL, domain.as_str())])
            .unwrap_or_default()
    }

    /// Indices of the free GPUs a job may be given: of its required model if it names one.
    pub fn free_gpus_for<'a>(&'a self, job: &'a crate::Job) -> impl Iterator<Item = u32> + 'a {
        let model = job.required_gpu_model();
        self.free_gpus().filter(move |i| {
            model.is_none_or(|m| {
                self.inventory
                    .gpus
                    .iter()
                    .any(|g| g.index == *i && g.model == m)
            })
        })
    }

    /// Indices of the GPUs no attempt holds, ascending. A node that counts GPUs without
    /// reporting devices numbers them `0..count`.
    pub fn free_gpus(&self) -> impl Iterator<Item = u32> + '_ {
        let indices: Vec<u32> = if self.inventory.gpus.is_empty() {
            (0..self.inventory.capacity.gpus).collect()
        } else {
            self.inventory.gpus.iter().map(|g| g.index).collect()
        };
        indices
            .into_iter()
            .filter(|i| !self.gpus_in_use.contains(i))
    }
}
