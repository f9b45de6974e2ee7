//! A simulated control node: Muster's own Raft node (openraft, the state machine, pre-vote
//! elections, forwarding), its Raft and agent gRPC services, and the loops every control node
//! runs (scheduler and plan applier, liveness, housekeeping), over turmoil's network and clock,
//! with the in-memory log and snapshot stores. The only part of `muster server` left out is
//! the HTTP API: the node's client calls its `RaftPlane` (the API's plane) directly.

use super::net;
use super::records::{ControlDisk, Records};
use super::workload;
use muster_control::{AgentGateway, Heartbeats, RaftPlane};
use muster_proto::pb::agent_service_server::AgentServiceServer;
use muster_proto::pb::raft_service_server::RaftServiceServer;
use muster_raft::{PeerAddrs, PeerDirectory, PeerNetwork, Raft, RaftGrpc, RaftNode, StateMachine};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const RAFT_PORT: u16 = 7000;
pub const AGENT_PORT: u16 = 7001;

/// Silence after which the leader marks an agent lost (`muster server`'s default).
pub const NODE_LOST_AFTER: Duration = muster_control::DEFAULT_NODE_LOST_AFTER;

pub fn host(id: u64) -> String {
    format!("cp{id}")
}

pub fn agent_addr(id: u64) -> String {
    format!("cp{id}:{AGENT_PORT}")
}

/// One incarnation of control node `id`; turmoil runs it again after a crash, on the same
/// disk.
pub async fn run(
    id: u64,
    voters: Vec<u64>,
    disk: ControlDisk,
    jitter_seed: u64,
    records: Records,
) -> turmoil::Result {
    let state_machine = StateMachine::open(
        disk.snapshots.clone(),
        disk.archive.clone(),
        muster_raft::SnapshotSpool::temporary(),
    )?;
    let state = state_machine.handle();
    let peers = PeerDirectory::with_dialer(net::dialer());
    for voter in &voters {
        peers.set(
            *voter,
            PeerAddrs {
                raft: format!("{}:{RAFT_PORT}", host(*voter)),
                agents: agent_addr(*voter),
                api: String::new(),
            },
        );
    }
    let config =
        Arc::new(muster_raft::raft_config("sim", muster_raft::SNAPSHOT_EVERY_ENTRIES).validate()?);
    let network = PeerNetwork::new(id, peers.clone());
    let raft = Raft::new(id, config, network, disk.log.clone(), state_machine).await?;
    let node = RaftNode::new(id, raft.clone(), state, peers.clone());
    records.lock().nodes.insert(
        id,
        super::records::SimNode {
            node: node.clone(),
            raft_log: disk.log.clone(),
        },
    );

    // Held for the life of this incarnation: the loops end when it is dropped with the host.
    let (_shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(muster_raft::election::run_elections(
        raft.clone(),
        id,
        peers,
        node.contact.clone(),
        node.elections.clone(),
        jitter_seed,
        shutdown.clone(),
    ));
    let raft_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)))
        .add_service(RaftServiceServer::new(RaftGrpc::new(node.clone())));
    let raft_incoming = net::incoming(RAFT_PORT).await?;
    tokio::spawn(async move {
        if let Err(e) = raft_server.serve_with_incoming(raft_incoming).await {
            tracing::error!(error = %e, "simulated Raft server failed");
        }
    });
    let heartbeats = Heartbeats::default();
    let agent_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(AgentGateway::new(
            node.clone(),
            shutdown.clone(),
            heartbeats.clone(),
            NODE_LOST_AFTER,
        )));
    let agent_incoming = net::incoming(AGENT_PORT).await?;
    tokio::spawn(async move {
        if let Err(e) = agent_server.serve_with_incoming(agent_incoming).await {
            tracing::error!(error = %e, "simulated agent server failed");
        }
    });
    let _loops = muster_control::spawn_loops(
        &node,
        &heartbeats,
        NODE_LOST_AFTER,
        // Ended jobs move to the archive a second after they end, amid the faults.
        muster_control::JobHistory {
            in_memory: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
        },
        shutdown.clone(),
    );

    // The lowest id founds the cluster, once, as `muster server` does.
    if id == voters[0] && !raft.is_initialized().await? {
        let members: std::collections::BTreeMap<u64, muster_raft::Member> = voters
            .iter()
            .map(|v| {
                (
                    *v,
                    muster_raft::Member {
                        addr: format!("{}:{RAFT_PORT}", host(*v)),
                        agents: agent_addr(*v),
                        api: String::new(),
                    },
                )
            })
            .collect();
        match raft.initialize(members).await {
            // And records the level its members report, as `muster server`'s founder does.
            Ok(()) => {
                let node = node.clone();
                tokio::spawn(async move { muster_control::bootstrap::found_at_level(&node).await });
            }
            Err(e) => tracing::warn!(error = %e, "initialisation refused"),
        }
    }

    let plane = RaftPlane::new(node.clone(), muster_api::Limits::default());
    workload::client(id, plane, records).await;
    std::future::pending::<()>().await;
    Ok(())
}
