//! Node liveness: the leader marks a node lost (one replicated `NodeLost` command) when no
//! heartbeat from it reached this control node for longer than the TTL. Agents heartbeat every
//! control node, so a new leader already knows who is alive; still, an election alone must
//! never cost a node, so each new term starts every node's clock afresh (as Nomad's failover
//! TTL does).

use muster_core::{Command, NodeId, NodeStatus, Timestamp};
use muster_raft::RaftNode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// When this control node last heard from each agent. Shared by the gateway (which records)
/// and the liveness loop (which reads); in memory only, never replicated.
#[derive(Clone, Default)]
pub struct Heartbeats {
    last_seen: Arc<Mutex<HashMap<NodeId, Timestamp>>>,
}

impl Heartbeats {
    pub fn record(&self, node: &NodeId) {
        self.lock().insert(node.clone(), crate::now_millis());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Timestamp>> {
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub async fn run(
    node: RaftNode,
    heartbeats: Heartbeats,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut leading_since: Option<(u64, Timestamp)> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let (leader, term) = node.leader();
        if leader != Some(node.id) {
            leading_since = None;
            continue;
        }
        let since = match leading_since {
            Some((t, since)) if t == term => since,
            _ => {
                leading_since = Some((term, crate::now_millis()));
                continue;
            }
        };
        let ready: Vec<(NodeId, Timestamp)> = node
            .state
            .read()
            .state
            .nodes()
            .filter(|n| n.status != NodeStatus::Lost)
            .map(|n| (n.id.clone(), n.registered_at))
            .collect();
        let now = crate::now_millis().as_millis();
        let lost: Vec<NodeId> = {
            let seen = heartbeats.lock();
            ready
                .into_iter()
                .filter(|(n, registered)| {
                    // Timed from the last heartbeat here, but never from before this term began
                    // or before the node (re)registered.
                    let last = seen
                        .get(n)
                        .copied()
                        .unwrap_or(since)
                        .max(since)
                        .max(*registered);
                    now.saturating_sub(last.as_millis()) > ttl.as_millis() as u64
                })
                .map(|(n, _)| n)
                .collect()
        };
        for lost_node in lost {
            tracing::warn!(node = %lost_node, ?ttl, "no heartbeat: marking the node lost");
            let cmd = Command::NodeLost {
                node: lost_node,
                at: crate::now_millis(),
            };
            if let Err(e) = node.raft.client_write(cmd.into()).await {
                tracing::debug!(error = %e, "node-lost not committed");
                break;
            }
        }
    }
}
