//! Multi-node jobs: their node jobs, placed all together or not at all, and the attempt that
//! the main node (or the first node to fail) ends for the whole gang.

use super::*;
use crate::{GangEnding, JobSpec, MultiNodeRole, NodeProperties, node_job_id};
use std::sync::Arc;

/// The `statusReason` of the nodes a gang stops when its main node has exited.
pub const MAIN_NODE_EXITED: &str = "Main node exited";

impl State {
    /// The node jobs of the multi-node job `parent`, in index order.
    pub fn gang_nodes<'a>(&'a self, parent: &'a JobId) -> impl Iterator<Item = &'a Job> + 'a {
        let size = self
            .jobs
            .get(parent)
            .and_then(|p| p.gang_size())
            .unwrap_or(0);
        (0..size).filter_map(move |i| self.job(&node_job_id(parent, i)))
    }

    /// Creates the node jobs of a multi-node job just admitted: each with its range's
    /// container (ranges share one spec), in the parent's status.
    pub(super) fn add_gang_nodes(&mut self, parent: &JobId, properties: &Arc<NodeProperties>) {
        let Some(template) = self.jobs.get(parent).map(|p| (**p).clone()) else {
            return;
        };
        let mut specs: Vec<(String, Arc<JobSpec>)> = Vec::new();
        for index in 0..properties.num_nodes {
            let Some(range) = properties.range_of(index) else {
                continue;
            };
            let spec = match specs.iter().find(|(t, _)| *t == range.target_nodes) {
                Some((_, spec)) => spec.clone(),
                None => {
                    let spec = Arc::new(JobSpec {
                        container: range.container.clone(),
                        fabric: crate::Fabric::required(&template.spec.tags, &range.options),
                        ..(*template.spec).clone()
                    });
                    specs.push((range.target_nodes.clone(), spec.clone()));
                    spec
                }
            };
            let node = Job {
                id: node_job_id(parent, index),
                spec,
                attempts: Vec::new(),
                waiting_on: BTreeSet::new(),
                multinode: Some(Box::new(MultiNodeRole::Node {
                    index,
                    num_nodes: properties.num_nodes,
                    main_node: properties.main_node,
                })),
                ..template.clone()
            };
            self.insert_job(node);
        }
    }

    /// Gives the node jobs of `parent` that hold nothing the parent's status (they wait,
    /// fail or end with it).
    pub(super) fn mirror_gang(&mut self, parent: &JobId) {
        let Some(p) = self.jobs.get(parent) else {
            return;
        };
        let Some(size) = p.gang_size() else {
            return;
        };
        let (status, reason, stopped_at, since, terminated, cancelled) = (
            p.status,
            p.status_reason.clone(),
            p.stopped_at,
            p.runnable_since,
            p.is_terminated,
            p.is_cancelled,
        );
        for index in 0..size {
            let Some(node) = self.jobs.get_mut(&node_job_id(parent, index)) else {
                continue;
            };
            if node.active.is_some() || node.status.is_terminal() {
                continue;
            }
            // A node that ran keeps the reason its own attempt ended with.
            if node.attempts.is_empty() || !status.is_terminal() {
                node.status_reason = reason.clone();
            }
            node.status = status;
            node.stopped_at = stopped_at;
            node.runnable_since = since;
            node.is_terminated = terminated;
            node.is_cancelled = cancelled;
            if status == JobStatus::Runnable {
                node.terminate_reason = None;
            }
        }
    }

    /// Why the placements of a whole gang cannot be applied, if they cannot: every node of
    /// the RUNNABLE job placed once, each on a worker of its own, each placement valid.
    pub fn gang_conflict(&self, parent: &JobId, placements: &[Placement]) -> Option<String> {
        let Some(p) = self.jobs.get(parent) else {
            return Some("job does not exist".into());
        };
        let Some(size) = p.gang_size() else {
            return Some("job is not a multi-node job".into());
        };
        if p.status != JobStatus::Runnable {
            return Some(format!("job is {}", p.status.as_aws()));
        }
        if placements.len() != size as usize {
            return Some(format!(
                "{} placements for a job of {size} nodes",
                placements.len()
            ));
        }
        let mut indices = BTreeSet::new();
        let mut workers = BTreeSet::new();
        for placement in placements {
            let index = self
                .jobs
                .get(&placement.job)
                .and_then(|j| j.gang_node())
                .filter(|(of, _, _)| of == parent)
                .map(|(_, index, _)| index);
            let Some(index) = index else {
                return Some(format!("{} is not a node of {parent}", placement.job));
            };
            if !indices.insert(index) {
                return Some(format!("node {index} is placed twice"));
            }
            if !workers.insert(&placement.node) {
                return Some(format!("two nodes are placed on {}", placement.node));
            }
            if self
                .nodes
                .get(&placement.node)
                .is_some_and(|n| n.gang_nodes > 0)
            {
                return Some(format!(
                    "{} runs a node of another multi-node job",
                    placement.node
                ));
            }
            if let Some(why) = self.placement_conflict(placement) {
                return Some(format!("node {index}: {why}"));
            }
        }
        None
    }

    /// Places a whole gang, or nothing of it. Returns whether it was placed.
    pub(super) fn place_gang(
        &mut self,
        term: u64,
        at: Timestamp,
        parent: &JobId,
        placements: Vec<Placement>,
    ) -> bool {
        if self.gang_conflict(parent, &placements).is_some() {
            return false;
        }
        let placed_where = self.topology_of(placements.iter().map(|p| &p.node));
        for placement in placements {
            if let Some(node) = self.jobs.get_mut(&placement.job) {
                node.terminate_reason = None;
                node.runnable_since = None;
            }
            self.place_one(term, at, placement);
        }
        if let Some(p) = self.jobs.get_mut(parent) {
            self.runnable.remove(p);
            p.status = JobStatus::Starting;
            p.status_reason = placed_where;
        }
        true
    }

    /// Where a gang's workers sit in the topology, as its `statusReason` says once placed:
    /// the narrowest domain holding them all, or how many domains of the widest level they
    /// span; `None` where the workers report no topology.
    fn topology_of<'a>(&self, workers: impl Iterator<Item = &'a NodeId>) -> Option<String> {
        let paths: Vec<Vec<(&str, &str)>> = workers
            .filter_map(|w| self.nodes.get(w))
            .map(|n| n.topology())
            .collect();
        let count = paths.len();
        let first = paths.first()?;
        let common = (0..first.len())
            .take_while(|&depth| paths.iter().all(|p| p.get(depth) == first.get(depth)))
            .count();
        if common > 0 {
            let domain: Vec<String> = first[..common]
                .iter()
                .map(|(level, name)| format!("{level}={name}"))
                .collect();
            return Some(format!(
                "Nodes placed: {count} workers within {}",
                domain.join("/")
            ));
        }
        let (level, _) = first.first()?;
        let domains: BTreeSet<Option<&(&str, &str)>> = paths.iter().map(|p| p.first()).collect();
        Some(format!(
            "Nodes placed: {count} workers across {} {level} domains",
            domains.len()
        ))
    }

    /// A node reported RUNNING: when it is the main node, the gang is RUNNING, and the other
    /// nodes are now assigned to their workers.
    pub(super) fn gang_node_running(&mut self, node: &JobId, at: Timestamp) {
        let Some((parent, _, true)) = self.jobs.get(node).and_then(|n| n.gang_node()) else {
            return;
        };
        if let Some(p) = self.jobs.get_mut(&parent)
            && p.status == JobStatus::Starting
        {
            p.status = JobStatus::Running;
            p.started_at = Some(at);
        }
    }

    /// A node's attempt ended (its record is written). The first node to end the gang's
    /// attempt decides how it ends: the main node whatever its exit, or another node that
    /// failed. Every other node is then stopped, and once none runs the attempt is over.
    pub(super) fn gang_node_exited(&mut self, node: &JobId, at: Timestamp) {
        let Some(job) = self.jobs.get(node) else {
            return;
        };
        let Some((parent, index, is_main)) = job.gang_node() else {
            return;
        };
        let Some(record) = job.attempts.last().cloned() else {
            return;
        };
        let undecided = self.jobs.get(&parent).is_some_and(|p| {
            matches!(
                p.multinode.as_deref(),
                Some(MultiNodeRole::Parent { ending: None, .. })
            )
        });
        let decides = undecided && (is_main || record.exit_code != Some(0));
        if decides {
            let ending = GangEnding {
                node_index: index,
                exit_code: record.exit_code,
                reason: record.reason.clone(),
                status_reason: if is_main {
                    record.status_reason.clone()
                } else {
                    format!("Node {index} failed: {}", record.status_reason)
                },
            };
            let stop_reason = if is_main {
                MAIN_NODE_EXITED.to_owned()
            } else {
                format!("Node {index} of the job failed")
            };
            self.decide_gang_ending(&parent, ending);
            self.stop_gang(&parent, &stop_reason, at);
        }
        if !self.stopping_gang {
            self.finish_gang_attempt(&parent, at);
        }
    }

    /// Records how the gang's attempt ends, unless something decided it already.
    pub(super) fn decide_gang_ending(&mut self, parent: &JobId, decided: GangEnding) {
        if let Some(p) = self.jobs.get_mut(parent)
            && let Some(MultiNodeRole::Parent { ending, .. }) = p.multinode.as_deref_mut()
        {
            ending.get_or_insert(decided);
        }
    }

    /// Stops every node of the gang that still holds an attempt: a running one through its
    /// agent (it is no longer assigned), one not started yet at once.
    pub(super) fn stop_gang(&mut self, parent: &JobId, reason: &str, at: Timestamp) {
        let size = self
            .jobs
            .get(parent)
            .and_then(|p| p.gang_size())
            .unwrap_or(0);
        // The nodes ended here each end the attempt's bookkeeping once, after the loop, rather
        // than each scanning the whole gang (a thousand nodes would cost a million lookups).
        self.stopping_gang = true;
        for index in 0..size {
            let id = node_job_id(parent, index);
            let Some(node) = self.jobs.get_mut(&id) else {
                continue;
            };
            let Some(active) = node.active.as_deref() else {
                continue;
            };
            let not_started = active
                .started_at
                .is_none()
                .then(|| (active.number, active.node.clone()));
            node.terminate_reason
                .get_or_insert_with(|| reason.to_owned());
            if let Some((attempt, worker)) = not_started {
                let event = AttemptEvent::Exited {
                    exit_code: None,
                    reason: Some(reason.to_owned()),
                };
                self.report(&id, attempt, &worker, event, at);
            }
        }
        self.stopping_gang = false;
    }

    /// Ends the gang's attempt once it is decided and no node holds anything: the parent
    /// records it (as its main node ran it) and runs again or ends, and its nodes with it.
    pub(super) fn finish_gang_attempt(&mut self, parent_id: &JobId, at: Timestamp) {
        let Some(parent) = self.jobs.get(parent_id) else {
            return;
        };
        let Some(MultiNodeRole::Parent {
            num_nodes,
            main_node,
            ending: Some(ending),
        }) = parent.multinode.as_deref()
        else {
            return;
        };
        let (num_nodes, main_node, ending) = (*num_nodes, *main_node, ending.clone());
        let busy = (0..num_nodes).any(|i| {
            self.jobs
                .get(&node_job_id(parent_id, i))
                .is_some_and(|n| n.active.is_some())
        });
        if busy {
            return;
        }
        let main_record = self
            .jobs
            .get(&node_job_id(parent_id, main_node))
            .and_then(|m| m.attempts.last().cloned());
        let Some(parent) = self.jobs.get_mut(parent_id) else {
            return;
        };
        if let Some(MultiNodeRole::Parent { ending, .. }) = parent.multinode.as_deref_mut() {
            *ending = None;
        }
        let number = parent.attempts.len() as u32 + 1;
        let record = AttemptRecord {
            node: main_record
                .as_ref()
                .map_or_else(|| NodeId(String::new()), |r| r.node.clone()),
            started_at: main_record.as_ref().and_then(|r| r.started_at),
            stopped_at: at,
            exit_code: ending.exit_code,
            reason: ending.reason.clone(),
            status_reason: ending.status_reason.clone(),
            log_stream_name: main_record
                .as_ref()
                .map(|r| r.log_stream_name.clone())
                .unwrap_or_default(),
        };
        let retry = ending.exit_code != Some(0)
            && parent.terminate_reason.is_none()
            && parent.spec.retry.retries(
                number,
                ending.exit_code,
                ending.reason.as_deref(),
                &ending.status_reason,
            );
        parent.attempts.reserve_exact(1);
        parent.attempts.push(record);
        parent.status_reason = Some(ending.status_reason.clone());
        if retry {
            parent.status = JobStatus::Runnable;
            parent.runnable_since = Some(at);
            self.runnable.insert(parent);
            self.mirror_gang(parent_id);
            return;
        }
        let succeeded = ending.exit_code == Some(0) && parent.terminate_reason.is_none();
        parent.status = if succeeded {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        };
        parent.stopped_at = Some(at);
        // The nodes end as the job does, each keeping the reason its own attempt ended with.
        let (status, terminated) = (parent.status, parent.is_terminated);
        for index in 0..num_nodes {
            if let Some(node) = self.jobs.get_mut(&node_job_id(parent_id, index)) {
                node.status = status;
                node.stopped_at = Some(at);
                node.is_terminated = terminated;
            }
        }
        self.settle(parent_id, at);
    }

    /// Ends a placed gang at a user's request (TerminateJob): its attempt ends with `reason`,
    /// and it is not retried.
    pub(super) fn terminate_gang(&mut self, parent: &JobId, reason: String, at: Timestamp) {
        let Some(p) = self.jobs.get_mut(parent) else {
            return;
        };
        // An attempt whose end is decided already (its main node exited) ends as decided:
        // its nodes are being stopped anyway.
        if matches!(
            p.multinode.as_deref(),
            Some(MultiNodeRole::Parent {
                ending: Some(_),
                ..
            })
        ) {
            return;
        }
        p.is_terminated = true;
        p.terminate_reason.get_or_insert(reason.clone());
        let main_node = match p.multinode.as_deref() {
            Some(MultiNodeRole::Parent { main_node, .. }) => *main_node,
            _ => return,
        };
        self.decide_gang_ending(
            parent,
            GangEnding {
                node_index: main_node,
                exit_code: None,
                reason: Some(reason.clone()),
                status_reason: reason.clone(),
            },
        );
        self.stop_gang(parent, &reason, at);
        self.finish_gang_attempt(parent, at);
    }

    /// The workers that run nodes of the gang `job` belongs to (or is the parent of).
    pub(super) fn gang_workers(&self, job: &JobId) -> Vec<NodeId> {
        let parent = match self.jobs.get(job) {
            Some(j) if j.gang_size().is_some() => job.clone(),
            Some(j) => match j.gang_node() {
                Some((parent, _, _)) => parent,
                None => return Vec::new(),
            },
            None => return Vec::new(),
        };
        self.gang_nodes(&parent)
            .filter_map(|n| n.active.as_ref().map(|a| a.node.clone()))
            .collect()
    }
}
