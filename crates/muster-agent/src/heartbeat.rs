//! Heartbeats to every control node, and what their answers say: contact with a leader that
//! holds a quorum, and who that leader is.

use crate::AgentConfig;
use crate::executor::Executor;
use crate::lease::Lease;
use crate::reporter::ControlClient;
use muster_proto::inventory_to_pb;
use muster_proto::pb::{HeartbeatRequest, RegisterRequest};
use std::sync::Arc;
use tokio::sync::watch;

/// A control node that answered a heartbeat as leader with a quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeenLeader {
    /// The agent address this agent reached it at.
    pub(crate) address: String,
    pub(crate) term: u64,
}

/// Heartbeats every control node (so that whichever leads, now or after an election, has
/// heard from this agent) with whether the executor can run jobs, and registers again with a
/// node that no longer knows it (the node was marked lost while this agent was cut off).
///
/// Only an answer from a leader that holds a quorum is contact (it renews the [`Lease`], from
/// when the heartbeat was sent), and such an answer is published in `leader_seen`: the leader alone
/// marks agents lost, and only from heartbeats, so an agent that reaches only a follower, or a
/// leader cut off from the other control nodes, is cut off, and so is one whose assignment
/// stream still delivers while its heartbeats do not arrive.
pub(crate) async fn heartbeat_loop(
    config: AgentConfig,
    offered: muster_core::NodeInventory,
    executor: Arc<Executor>,
    control: ControlClient,
    lease: Arc<Lease>,
    leader_seen: watch::Sender<Option<SeenLeader>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut beat = HeartbeatRequest {
        node_id: config.node_id.clone(),
        inventory: Some(inventory_to_pb(&offered)),
        unhealthy: None,
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(config.heartbeat) => {}
        }
        let unhealthy = executor.health().await;
        if unhealthy != beat.unhealthy {
            match &unhealthy {
                Some(why) => tracing::error!(reason = %why, "this node cannot run jobs"),
                None => tracing::info!("this node can run jobs again"),
            }
            beat.unhealthy = unhealthy;
        }
        // Every node at once, each answer awaited a bounded time: a node that does not answer
        // (stopped, cut off) must not hold back the heartbeat to the one that leads.
        // Contact counts from when the heartbeat left, never from when its answer came: the
        // leader timed this node's silence from the heartbeat's arrival, which came first, so
        // this node stops its attempts (`stop_after` past contact) before the leader may
        // retry them elsewhere (`node_lost_after` past arrival), however slow the answer.
        let sent_at = tokio::time::Instant::now();
        let addrs = control.addrs();
        let answers = futures::future::join_all(addrs.iter().filter_map(|addr| {
            let mut client = control.client(addr)?;
            // A reply waits for any inventory or health change it carries to commit; one that
            // comes late still counts (from when the heartbeat left), so it is given a quarter
            // of `stop_after` rather than one interval.
            let (beat, wait) = (beat.clone(), config.heartbeat.max(config.stop_after / 4));
            Some(async move {
                let answer = tokio::time::timeout(wait, client.heartbeat(beat)).await;
                (addr, answer)
            })
        }))
        .await;
        let mut unknown = false;
        for (addr, answer) in answers {
            match answer {
                Ok(Ok(reply)) if reply.get_ref().leading => {
                    let lost_after = Some(reply.get_ref().node_lost_after_ms)
                        .filter(|ms| *ms > 0)
                        .map(std::time::Duration::from_millis);
                    lease.renew(sent_at, lost_after);
                    control.learn(&reply.get_ref().control_plane);
                    let seen = SeenLeader {
                        address: addr.clone(),
                        term: reply.get_ref().term,
                    };
                    leader_seen.send_if_modified(|was| {
                        let newer = was.as_ref() != Some(&seen);
                        *was = Some(seen);
                        newer
                    });
                }
                Ok(Ok(_)) => {}
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => unknown = true,
                // Revoked, or a certificate the cluster no longer takes: nothing this agent
                // can mend by itself, and its jobs stop when its lease ends.
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    ) =>
                {
                    tracing::error!(addr, error = %status.message(), "the control plane refuses this agent")
                }
                Ok(Err(status)) => {
                    tracing::debug!(addr, error = %status.message(), "heartbeat not delivered")
                }
                Err(_) => tracing::debug!(addr, "heartbeat not answered in time"),
            }
        }
        if unknown {
            let register = RegisterRequest {
                node_id: config.node_id.clone(),
                compute_environment: config.compute_environment.clone(),
                inventory: Some(inventory_to_pb(&offered)),
            };
            for addr in &control.addrs() {
                if let Some(mut client) = control.client(addr)
                    && client.register(register.clone()).await.is_ok()
                {
                    tracing::info!(node = %config.node_id, "registered again after being marked lost");
                    break;
                }
            }
        }
    }
}
