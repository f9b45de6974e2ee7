//! Worker nodes as the control plane knows them.

use crate::{JobId, NodeId, Resources, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

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
}

/// One GPU as the agent found it through NVML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Ready,
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
    /// Jobs whose active attempt is on this node.
    pub placed_jobs: BTreeSet<JobId>,
    /// GPU indices held by those jobs' attempts.
    #[serde(default)]
    pub gpus_in_use: BTreeSet<u32>,
    pub registered_at: Timestamp,
}

impl Node {
    pub fn free(&self) -> Resources {
        self.inventory.capacity.saturating_sub(&self.allocated)
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
