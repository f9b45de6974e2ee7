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
use tokio::time::Instant;

/// When this control node last heard from each agent. Shared by the gateway (which records)
/// and the liveness loop (which reads); in memory only, never replicated. Timed on the
/// monotonic clock: a wall clock stepped forward (NTP, an operator) must not make every agent
/// look silent, nor one stepped back make a dead one look alive.
#[derive(Clone, Default)]
pub struct Heartbeats {
    last_seen: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl Heartbeats {
    pub fn record(&self, node: &NodeId) {
        self.lock().insert(node.clone(), Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
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
    let mut leading_since: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let (_, term) = node.leader();
        // Only a leader that holds a quorum judges: one cut off from the others hears from
        // no agent the new leader now serves. Losing the quorum starts every clock afresh.
        if !node.leads_with_quorum() {
            leading_since = None;
            continue;
        }
        let since = match leading_since {
            Some((t, since)) if t == term => since,
            _ => {
                leading_since = Some((term, Instant::now()));
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
        let wall_now = crate::now_millis().as_millis();
        let lost: Vec<NodeId> = {
            let seen = heartbeats.lock();
            ready
                .into_iter()
                .filter(|(n, registered)| {
                    // Silent since the last heartbeat here, but never since before this term
                    // began or this node last held a quorum...
                    let silent = seen.get(n).copied().unwrap_or(since).max(since).elapsed() > ttl;
                    // ...nor since before the node (re)registered, which another node may have
                    // stamped: a registration stamped in this clock's future counts as old.
                    let registered_long_ago = wall_now < registered.as_millis()
                        || wall_now - registered.as_millis() > ttl.as_millis() as u64;
                    silent && registered_long_ago
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
            if let Err(e) = node.write_as_leader(cmd).await {
                tracing::debug!(error = %e, "node-lost not committed");
                break;
            }
        }
    }
}
