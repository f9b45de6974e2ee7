//! Multi-node parallel jobs: a definition's `nodeProperties`, a submit's `nodeOverrides`, and
//! where a job sits in a gang.
//!
//! A multi-node job is a parent that never runs itself and `numNodes` node jobs
//! (`<parent>#<index>`), placed together by one command on distinct workers or not at all. The
//! main node starts first; the others once it runs. The attempt ends when the main node exits
//! (with its status) or when another node fails first; every node is then stopped, and the
//! whole gang runs again if the retry strategy says so.

use super::{ContainerOptions, ContainerOverrides, ContainerSpec};
use crate::Rejection;
use serde::{Deserialize, Serialize};

/// At most this many nodes in one multi-node job.
pub const MAX_NODES: u32 = 1000;

/// `nodeProperties` of a `multinode` definition, or of a job after its `nodeOverrides`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProperties {
    pub num_nodes: u32,
    pub main_node: u32,
    /// `nodeRangeProperties`, in the order given; together they name every node exactly once.
    pub ranges: Vec<NodeRange>,
}

/// One `nodeRangeProperties` entry: the container that a range of nodes runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRange {
    /// As written: `i`, `i:`, `:j` or `i:j` (an open end means the first or last node, so a
    /// submit that changes `numNodes` moves it).
    pub target_nodes: String,
    pub container: ContainerSpec,
    /// The Docker options of the range's `container` (devices such as
    /// `/dev/infiniband/uverbs0` among them).
    #[serde(default)]
    pub options: ContainerOptions,
}

/// `targetNodes` as the first and last node it names among `num_nodes`, if it is well formed.
pub fn target_bounds(target: &str, num_nodes: u32) -> Option<(u32, u32)> {
    let bound = |s: &str, open: u32| -> Option<u32> {
        if s.is_empty() {
            Some(open)
        } else {
            s.trim().parse().ok()
        }
    };
    let (from, to) = match target.split_once(':') {
        Some((a, b)) => (bound(a, 0)?, bound(b, num_nodes.checked_sub(1)?)?),
        None if !target.is_empty() => {
            let i = bound(target, 0)?;
            (i, i)
        }
        None => return None,
    };
    (from <= to && to < num_nodes).then_some((from, to))
}

impl NodeProperties {
    /// Checks what AWS checks: `numNodes` within limits, `mainNode` a node, and ranges that
    /// name every node exactly once. `field` prefixes the member named in a refusal.
    pub fn check(&self, field: &str) -> Result<(), Rejection> {
        if !(1..=MAX_NODES).contains(&self.num_nodes) {
            return Err(Rejection::new(
                &format!("{field}.numNodes"),
                format!(
                    "{field}.numNodes: {} must be between 1 and {MAX_NODES}",
                    self.num_nodes
                ),
            ));
        }
        if self.main_node >= self.num_nodes {
            return Err(Rejection::new(
                &format!("{field}.mainNode"),
                format!(
                    "{field}.mainNode: {} must be a node index below numNodes ({})",
                    self.main_node, self.num_nodes
                ),
            ));
        }
        let ranges_field = format!("{field}.nodeRangeProperties");
        if self.ranges.is_empty() {
            return Err(Rejection::new(
                &ranges_field,
                format!("{ranges_field} must list at least one range"),
            ));
        }
        let mut owner: Vec<Option<&str>> = vec![None; self.num_nodes as usize];
        for range in &self.ranges {
            let Some((from, to)) = target_bounds(&range.target_nodes, self.num_nodes) else {
                return Err(Rejection::new(
                    &format!("{ranges_field}.targetNodes"),
                    format!(
                        "{ranges_field}.targetNodes: '{}' is not i, i:, :j or i:j with i <= j < numNodes ({})",
                        range.target_nodes, self.num_nodes
                    ),
                ));
            };
            for index in from..=to {
                if let Some(other) = owner[index as usize].replace(&range.target_nodes) {
                    return Err(Rejection::new(
                        &format!("{ranges_field}.targetNodes"),
                        format!(
                            "{ranges_field}.targetNodes: node {index} is in both '{other}' and '{}'; each node must be in exactly one range",
                            range.target_nodes
                        ),
                    ));
                }
            }
        }
        if let Some(missing) = owner.iter().position(Option::is_none) {
            return Err(Rejection::new(
                &format!("{ranges_field}.targetNodes"),
                format!("{ranges_field}.targetNodes: node {missing} is in no range"),
            ));
        }
        Ok(())
    }

    /// The range that node `index` belongs to (the properties were checked).
    pub fn range_of(&self, index: u32) -> Option<&NodeRange> {
        self.ranges.iter().find(|r| {
            target_bounds(&r.target_nodes, self.num_nodes)
                .is_some_and(|(from, to)| (from..=to).contains(&index))
        })
    }

    /// The properties a submit runs with: `numNodes` replaced (open-ended ranges stretch or
    /// shrink with it) and each override's container changes applied to the nodes it targets.
    pub fn with_overrides(&self, overrides: &NodeOverrides) -> Result<NodeProperties, Rejection> {
        const FIELD: &str = "nodeOverrides";
        let mut out = self.clone();
        if let Some(n) = overrides.num_nodes {
            out.num_nodes = n;
            out.check(FIELD).map_err(|r| {
                Rejection::new(
                    "nodeOverrides.numNodes",
                    format!(
                        "nodeOverrides.numNodes: {n} does not fit the definition's node ranges ({})",
                        r.message
                    ),
                )
            })?;
        }
        if overrides.ranges.is_empty() {
            return Ok(out);
        }
        // An override names nodes by its own targetNodes; where those cut a definition range,
        // the range is split so that every node still runs exactly one container.
        out.check(FIELD)?;
        let mut per_node: Vec<(ContainerSpec, ContainerOptions)> = Vec::new();
        for i in 0..out.num_nodes {
            // Checked just above: every node is in a range.
            let Some(range) = out.range_of(i) else {
                return Err(Rejection::new(
                    "nodeOverrides",
                    format!("nodeOverrides: node {i} is in no range"),
                ));
            };
            per_node.push((range.container.clone(), range.options.clone()));
        }
        for o in &overrides.ranges {
            let Some((from, to)) = target_bounds(&o.target_nodes, out.num_nodes) else {
                return Err(Rejection::new(
                    "nodeOverrides.nodePropertyOverrides.targetNodes",
                    format!(
                        "nodeOverrides.nodePropertyOverrides.targetNodes: '{}' is not i, i:, :j or i:j within numNodes ({})",
                        o.target_nodes, out.num_nodes
                    ),
                ));
            };
            for node in &mut per_node[from as usize..=to as usize] {
                node.0 = node.0.with_overrides(&o.container_overrides);
            }
        }
        out.ranges = Vec::new();
        let mut start = 0usize;
        for i in 1..=per_node.len() {
            if i == per_node.len() || per_node[i] != per_node[start] {
                let (container, options) = per_node[start].clone();
                out.ranges.push(NodeRange {
                    target_nodes: if i - 1 == start {
                        start.to_string()
                    } else {
                        format!("{start}:{}", i - 1)
                    },
                    container,
                    options,
                });
                start = i;
            }
        }
        Ok(out)
    }
}

/// `nodeOverrides` on SubmitJob.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOverrides {
    pub num_nodes: Option<u32>,
    /// `nodePropertyOverrides`: container changes for the nodes each `targetNodes` names.
    pub ranges: Vec<NodeOverride>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOverride {
    pub target_nodes: String,
    pub container_overrides: ContainerOverrides,
}

/// Where a job sits in a multi-node job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiNodeRole {
    /// The job that was submitted. It holds nothing itself; its status follows its gang.
    Parent {
        num_nodes: u32,
        main_node: u32,
        /// How the attempt in flight ends, once decided (the main node exited, or another
        /// failed first); the attempt is over when every node has stopped.
        ending: Option<GangEnding>,
    },
    /// Node `index`, id `<parent>#<index>`.
    Node {
        index: u32,
        num_nodes: u32,
        main_node: u32,
    },
}

/// How a gang's attempt ends: as the node that decided it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangEnding {
    pub node_index: u32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub status_reason: String,
}

/// The id of node `index` of the multi-node job `parent`.
pub fn node_job_id(parent: &crate::JobId, index: u32) -> crate::JobId {
    crate::JobId::from(format!("{parent}#{index}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(num_nodes: u32, main_node: u32, targets: &[&str]) -> NodeProperties {
        NodeProperties {
            num_nodes,
            main_node,
            ranges: targets
                .iter()
                .map(|t| NodeRange {
                    target_nodes: (*t).to_owned(),
                    container: ContainerSpec {
                        image: format!("image-{t}"),
                        ..Default::default()
                    },
                    options: ContainerOptions::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn target_nodes_take_every_form_aws_documents() {
        assert_eq!(target_bounds("0:3", 8), Some((0, 3)));
        assert_eq!(target_bounds("4:", 8), Some((4, 7)));
        assert_eq!(target_bounds(":2", 8), Some((0, 2)));
        assert_eq!(target_bounds("7", 8), Some((7, 7)));
        assert_eq!(target_bounds(":", 8), Some((0, 7)));
        assert_eq!(target_bounds("8", 8), None);
        assert_eq!(target_bounds("3:1", 8), None);
        assert_eq!(target_bounds("a:", 8), None);
        assert_eq!(target_bounds("", 8), None);
    }

    #[test]
    fn ranges_must_name_every_node_exactly_once() {
        assert!(props(4, 0, &["0", "1:"]).check("nodeProperties").is_ok());
        let overlap = props(4, 0, &["0:2", "2:"])
            .check("nodeProperties")
            .unwrap_err();
        assert_eq!(
            overlap.field,
            "nodeProperties.nodeRangeProperties.targetNodes"
        );
        assert!(
            overlap.message.contains("node 2 is in both"),
            "{}",
            overlap.message
        );
        let gap = props(4, 0, &["0", "2:"])
            .check("nodeProperties")
            .unwrap_err();
        assert!(
            gap.message.contains("node 1 is in no range"),
            "{}",
            gap.message
        );
        let main = props(4, 4, &[":"]).check("nodeProperties").unwrap_err();
        assert_eq!(main.field, "nodeProperties.mainNode");
        let none = props(0, 0, &[":"]).check("nodeProperties").unwrap_err();
        assert_eq!(none.field, "nodeProperties.numNodes");
    }

    #[test]
    fn overrides_change_the_node_count_and_split_ranges_where_they_cut_them() {
        let base = props(4, 0, &["0", "1:"]);
        let grown = base
            .with_overrides(&NodeOverrides {
                num_nodes: Some(6),
                ranges: Vec::new(),
            })
            .unwrap();
        assert_eq!(grown.num_nodes, 6);
        assert_eq!(grown.range_of(5).unwrap().container.image, "image-1:");
        // A closed range cannot take more nodes.
        let closed = props(4, 0, &["0", "1:3"]);
        let err = closed
            .with_overrides(&NodeOverrides {
                num_nodes: Some(6),
                ranges: Vec::new(),
            })
            .unwrap_err();
        assert_eq!(err.field, "nodeOverrides.numNodes");

        let split = base
            .with_overrides(&NodeOverrides {
                num_nodes: None,
                ranges: vec![NodeOverride {
                    target_nodes: "3".into(),
                    container_overrides: ContainerOverrides {
                        command: Some(vec!["last".into()]),
                        ..Default::default()
                    },
                }],
            })
            .unwrap();
        split.check("nodeProperties").unwrap();
        let targets: Vec<&str> = split
            .ranges
            .iter()
            .map(|r| r.target_nodes.as_str())
            .collect();
        assert_eq!(targets, ["0", "1:2", "3"]);
        assert_eq!(split.range_of(3).unwrap().container.command, ["last"]);
        assert!(split.range_of(2).unwrap().container.command.is_empty());
    }
}
