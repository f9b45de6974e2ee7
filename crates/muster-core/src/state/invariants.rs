//! Invariants of a state that every `apply` keeps, checked where a state is replayed.

use super::State;
use crate::{JobId, NodeId, Resources};
use std::collections::{BTreeMap, BTreeSet};

impl State {
    /// What would make a node's books wrong: more placed than it holds, an allocation that is
    /// not the sum of the jobs placed there, a GPU given twice or one the node does not have.
    /// Empty for every state `apply` can reach (checked after every entry when a committed log
    /// is replayed, `muster debug replay-log`, and by the chaos harness).
    pub fn resource_violations(&self) -> Vec<String> {
        let mut held: BTreeMap<&NodeId, (Resources, Vec<u32>, BTreeSet<&JobId>)> = BTreeMap::new();
        let mut gang_nodes: BTreeMap<&NodeId, u32> = BTreeMap::new();
        for job in self.jobs.values() {
            if let Some(active) = &job.active {
                let entry = held.entry(&active.node).or_default();
                entry.0 = entry.0 + job.spec.container.resources();
                entry.1.extend(active.gpus.iter().copied());
                entry.2.insert(&job.id);
                if job.gang_node().is_some() {
                    *gang_nodes.entry(&active.node).or_default() += 1;
                }
            }
        }
        let mut violations = Vec::new();
        for node in self.nodes.values() {
            let (sum, gpus, jobs) = held.remove(&node.id).unwrap_or_default();
            if sum != node.allocated {
                violations.push(format!(
                    "node {}: allocated {:?}, but the jobs placed there hold {sum:?}",
                    node.id, node.allocated
                ));
            }
            if !node.allocated.fits_in(&node.inventory.capacity) {
                violations.push(format!(
                    "node {} is over-committed: {:?} placed on {:?}",
                    node.id, node.allocated, node.inventory.capacity
                ));
            }
            let distinct: BTreeSet<u32> = gpus.iter().copied().collect();
            if distinct.len() != gpus.len() {
                violations.push(format!("node {}: a GPU is held twice: {gpus:?}", node.id));
            }
            if let Some(unknown) = distinct
                .iter()
                .find(|g| !node.inventory.gpus.iter().any(|d| d.index == **g))
            {
                violations.push(format!("node {}: GPU {unknown} is not the node's", node.id));
            }
            let gangs = gang_nodes.get(&node.id).copied().unwrap_or(0);
            if gangs != node.gang_nodes || gangs > 1 {
                violations.push(format!(
                    "node {}: {gangs} nodes of multi-node jobs run there (counted {}; at most one may)",
                    node.id, node.gang_nodes
                ));
            }
            let listed: BTreeSet<&JobId> = node.placed_jobs.iter().collect();
            if listed != jobs {
                violations.push(format!(
                    "node {}: lists placed jobs {listed:?}, but {jobs:?} are active there",
                    node.id
                ));
            }
        }
        for (node, (_, _, jobs)) in held {
            violations.push(format!(
                "jobs {jobs:?} are active on {node}, which is not a node"
            ));
        }
        violations
    }
}
