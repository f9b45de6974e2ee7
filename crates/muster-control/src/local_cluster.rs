//! Several control nodes in one process, each with its own data directory and ports: what
//! `muster dev` runs and what the integration tests kill and restart.

use crate::{ControlNode, Listeners, ServerConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use muster_raft::PeerAddrs;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Limits and timings of a local cluster.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub limits: muster_api::Limits,
    pub node_lost_after: std::time::Duration,
    /// The region and account the cluster's ARNs name.
    pub scope: muster_core::ArnScope,
    /// Mutual TLS on every internal port, with a CA made for the cluster (the default; off
    /// only where a test or the bench drives the agent protocol itself).
    pub tls: bool,
    /// How long the nodes' first certificates are valid (tests shorten it to see them
    /// renewed).
    pub node_cert_validity: Duration,
    /// How long ended jobs stay in memory, then on disk (tests and the bench archive at once).
    pub history: crate::JobHistory,
    /// Nodes that report a command level below this release's, standing in for nodes of an
    /// earlier release (tests of the cluster level).
    pub command_levels: BTreeMap<u64, u32>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            limits: muster_api::Limits::default(),
            node_lost_after: crate::config::DEFAULT_NODE_LOST_AFTER,
            scope: Default::default(),
            tls: true,
            node_cert_validity: LOCAL_CERT_VALIDITY,
            history: crate::JobHistory::default(),
            command_levels: BTreeMap::new(),
        }
    }
}

/// A local cluster's CA and its nodes' identities, kept under `data_dir/tls`.
struct LocalPki {
    ca: std::sync::Arc<muster_tls::pki::ClusterCa>,
    dir: PathBuf,
    /// Each node's files: read again at every start, so a restarted node presents the
    /// certificate it last renewed.
    nodes: BTreeMap<u64, muster_tls::TlsFiles>,
}

/// Local clusters' certificates: long enough for any session.
const LOCAL_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct LocalCluster {
    data_dir: PathBuf,
    cluster_name: String,
    metrics: Option<PrometheusHandle>,
    /// `None` while a node is stopped.
    nodes: BTreeMap<u64, Option<ControlNode>>,
    grpc_addrs: BTreeMap<u64, SocketAddr>,
    raft_addrs: BTreeMap<u64, SocketAddr>,
    api_addrs: BTreeMap<u64, SocketAddr>,
    limits: muster_api::Limits,
    /// Heartbeat silence after which the leader marks an agent lost.
    node_lost_after: std::time::Duration,
    history: crate::JobHistory,
    scope: muster_core::ArnScope,
    /// `None`: plaintext internal ports.
    pki: Option<LocalPki>,
    /// See [`Tuning::command_levels`].
    command_levels: BTreeMap<u64, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] crate::node::StartError),
    #[error("no leader was elected within {0:?}")]
    NoLeader(Duration),
    #[error("cannot make the cluster's certificates: {0}")]
    Pki(String),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ClusterError> {
    // A node restarted in place takes its old ports back; the old sockets may take a moment
    // to be released.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ClusterError::Bind {
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("bind failed")),
    })
}

impl LocalPki {
    /// A new CA in `dir` (an earlier one there is replaced: a local cluster's CA lives as
    /// long as the process) and the certificates of nodes 1 to `size`.
    fn make(dir: &Path, size: u64, validity: Duration) -> Result<Self, ClusterError> {
        let pki = |e: muster_tls::pki::PkiError| ClusterError::Pki(e.to_string());
        let ca = muster_tls::pki::ClusterCa::generate("muster-dev").map_err(pki)?;
        let _ = std::fs::remove_file(dir.join("ca.pem"));
        let mut nodes = BTreeMap::new();
        for id in 1..=size {
            let files = muster_tls::pki::write_identity(
                &ca,
                dir,
                &format!("control-{id}"),
                &muster_tls::Role::Control(id),
                &["127.0.0.1".to_owned(), "localhost".to_owned()],
                muster_tls::pki::Validity {
                    not_before: std::time::SystemTime::now() - Duration::from_secs(1),
                    not_after: std::time::SystemTime::now() + validity,
                },
            )
            .map_err(pki)?;
            nodes.insert(id, files);
        }
        Ok(Self {
            ca: std::sync::Arc::new(ca),
            dir: dir.to_owned(),
            nodes,
        })
    }
}

impl LocalCluster {
    /// Starts `size` control nodes under `data_dir/node-<id>`, all on 127.0.0.1. Node 1's API
    /// listens on `first_api_addr` (port 0 picks one); every other port is picked freely.
    pub async fn start(
        data_dir: &Path,
        size: u64,
        first_api_addr: SocketAddr,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, ClusterError> {
        Self::start_tuned(data_dir, size, first_api_addr, metrics, Tuning::default()).await
    }

    /// [`LocalCluster::start`] with other limits and timings (tests lower AWS's minimums and
    /// the node-lost TTL so that they can be tested in seconds).
    pub async fn start_tuned(
        data_dir: &Path,
        size: u64,
        first_api_addr: SocketAddr,
        metrics: Option<PrometheusHandle>,
        tuning: Tuning,
    ) -> Result<Self, ClusterError> {
        let Tuning {
            limits,
            node_lost_after,
            scope,
            tls,
            node_cert_validity,
            history,
            command_levels,
        } = tuning;
        let pki = if tls {
            Some(LocalPki::make(
                &data_dir.join("tls"),
                size,
                node_cert_validity,
            )?)
        } else {
            None
        };
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let mut grpc = BTreeMap::new();
        let mut raft = BTreeMap::new();
        let mut api = BTreeMap::new();
        for id in 1..=size {
            grpc.insert(id, bind(any).await?);
            raft.insert(id, bind(any).await?);
            api.insert(id, bind(if id == 1 { first_api_addr } else { any }).await?);
        }
        let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        let mut cluster = LocalCluster {
            data_dir: data_dir.to_owned(),
            cluster_name: "muster-dev".to_owned(),
            metrics,
            nodes: BTreeMap::new(),
            grpc_addrs: grpc.iter().map(|(id, l)| (*id, addr(l))).collect(),
            raft_addrs: raft.iter().map(|(id, l)| (*id, addr(l))).collect(),
            api_addrs: api.iter().map(|(id, l)| (*id, addr(l))).collect(),
            limits,
            node_lost_after,
            history,
            scope,
            pki,
            command_levels,
        };
        for (id, grpc) in grpc {
            let listeners = Listeners {
                grpc,
                raft: raft.remove(&id).expect("one Raft listener per node"),
                api: api.remove(&id).expect("one API listener per node"),
            };
            let node =
                ControlNode::start(cluster.config(id)?, listeners, cluster.metrics.clone()).await?;
            cluster.nodes.insert(id, Some(node));
        }
        Ok(cluster)
    }

    fn config(&self, id: u64) -> Result<ServerConfig, ClusterError> {
        let tls = match &self.pki {
            Some(pki) => Some(std::sync::Arc::new(
                muster_tls::renew::load_finishing_renewal("tls", &pki.nodes[&id])
                    .map_err(|e| ClusterError::Pki(e.to_string()))?,
            )),
            None => None,
        };
        Ok(ServerConfig {
            node_id: id,
            grpc_addr: self.grpc_addrs[&id],
            raft_addr: self.raft_addrs[&id],
            api_addr: self.api_addrs[&id],
            data_dir: self.data_dir.join(format!("node-{id}")),
            cluster_name: self.cluster_name.clone(),
            peers: self
                .grpc_addrs
                .iter()
                .map(|(id, agents)| {
                    let addrs = PeerAddrs {
                        raft: self.raft_addrs[id].to_string(),
                        agents: agents.to_string(),
                        api: self.api_addrs[id].to_string(),
                    };
                    (*id, addrs)
                })
                .collect(),
            root_credentials_dir: None,
            history: self.history,
            node_lost_after: self.node_lost_after,
            snapshot_every_entries: muster_raft::SNAPSHOT_EVERY_ENTRIES,
            limits: self.limits,
            command_level: self
                .command_levels
                .get(&id)
                .copied()
                .unwrap_or(muster_core::COMMAND_LEVEL),
            scope: self.scope.clone(),
            tls,
            tls_files: self.pki.as_ref().map(|pki| pki.nodes[&id].clone()),
            found_with_defaults: false,
            founding_join_token: None,
            api_tls: None,
            join_existing_cluster: false,
            ca: self.pki.as_ref().map(|pki| pki.ca.clone()),
        })
    }

    /// Starts a new, empty control node `id` (a certificate of the cluster's CA, listeners of
    /// its own) that waits to be added; returns where it listens, for `RaftNode::add_node`.
    pub async fn start_node_to_add(
        &mut self,
        id: u64,
    ) -> Result<muster_raft::Member, ClusterError> {
        if let Some(pki) = &mut self.pki {
            let files = muster_tls::pki::write_identity(
                &pki.ca,
                &pki.dir,
                &format!("control-{id}"),
                &muster_tls::Role::Control(id),
                &["127.0.0.1".to_owned(), "localhost".to_owned()],
                muster_tls::pki::Validity::from_now(LOCAL_CERT_VALIDITY),
            )
            .map_err(|e| ClusterError::Pki(e.to_string()))?;
            pki.nodes.insert(id, files);
        }
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let listeners = Listeners {
            grpc: bind(any).await?,
            raft: bind(any).await?,
            api: bind(any).await?,
        };
        let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
        self.grpc_addrs.insert(id, addr(&listeners.grpc));
        self.raft_addrs.insert(id, addr(&listeners.raft));
        self.api_addrs.insert(id, addr(&listeners.api));
        let mut config = self.config(id)?;
        config.join_existing_cluster = true;
        let member = muster_raft::Member::from(&config.peers[&id]);
        let node = ControlNode::start(config, listeners, self.metrics.clone()).await?;
        self.nodes.insert(id, Some(node));
        Ok(member)
    }

    /// The `[tls]` files of an agent named `name`, issued by this cluster's CA under
    /// `data_dir/tls` (`None` when the cluster runs plaintext).
    pub fn agent_tls(&self, name: &str) -> Result<Option<muster_tls::TlsFiles>, ClusterError> {
        let Some(pki) = &self.pki else {
            return Ok(None);
        };
        muster_tls::pki::write_identity(
            &pki.ca,
            &pki.dir,
            &format!("agent-{name}"),
            &muster_tls::Role::Agent(name.to_owned()),
            &[],
            muster_tls::pki::Validity::from_now(LOCAL_CERT_VALIDITY),
        )
        .map(Some)
        .map_err(|e| ClusterError::Pki(e.to_string()))
    }

    /// The cluster's CA (`None` when plaintext): tests issue certificates of their own with it.
    pub fn ca(&self) -> Option<&muster_tls::pki::ClusterCa> {
        self.pki.as_ref().map(|pki| pki.ca.as_ref())
    }

    pub fn node(&self, id: u64) -> Option<&ControlNode> {
        self.nodes.get(&id).and_then(Option::as_ref)
    }

    pub fn running(&self) -> impl Iterator<Item = &ControlNode> {
        self.nodes.values().flatten()
    }

    pub fn api_addr(&self, id: u64) -> SocketAddr {
        self.api_addrs[&id]
    }

    /// Where node `id` serves its peers' Raft RPCs.
    pub fn raft_addr(&self, id: u64) -> SocketAddr {
        self.raft_addrs[&id]
    }

    pub fn grpc_addrs(&self) -> Vec<String> {
        self.grpc_addrs
            .values()
            .map(SocketAddr::to_string)
            .collect()
    }

    /// The leader, if the running nodes agree on one that is itself running.
    pub fn leader(&self) -> Option<u64> {
        let mut seen = self.running().filter_map(|n| n.raft.leader().0);
        let first = seen.next()?;
        (self.node(first).is_some_and(|n| n.raft.is_leader())).then_some(first)
    }

    pub async fn wait_for_leader(&self, within: Duration) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(leader) = self.leader() {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoLeader(within));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops one node as a crash would look to its peers: its connections drop and it
    /// answers nothing until restarted.
    pub async fn stop_node(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id).and_then(Option::take) {
            node.shutdown().await;
        }
    }

    /// The command level node `id` reports from its next start (a test's upgrade of a node).
    pub fn set_command_level(&mut self, id: u64, level: u32) {
        self.command_levels.insert(id, level);
    }

    /// Restarts a stopped node from its data directory on its old ports.
    pub async fn restart_node(&mut self, id: u64) -> Result<(), ClusterError> {
        self.stop_node(id).await;
        let listeners = Listeners {
            grpc: bind(self.grpc_addrs[&id]).await?,
            raft: bind(self.raft_addrs[&id]).await?,
            api: bind(self.api_addrs[&id]).await?,
        };
        let node = ControlNode::start(self.config(id)?, listeners, self.metrics.clone()).await?;
        self.nodes.insert(id, Some(node));
        Ok(())
    }

    /// Makes the root user and its key (kept in `dir/credentials`) exist; see
    /// [`crate::bootstrap::ensure_root`]. First waits (up to 15 s) until every running node
    /// records the command level the founder set (the lowest its nodes report), so that
    /// nothing a caller does with the key meets a cluster that refuses what its level allows.
    pub async fn ensure_root(
        &self,
        dir: &Path,
    ) -> Result<crate::bootstrap::Credentials, crate::bootstrap::BootstrapError> {
        // The lowest level a node reports, where the founder could raise it to.
        let lowest = self
            .command_levels
            .values()
            .copied()
            .fold(muster_core::COMMAND_LEVEL, u32::min);
        let founded_at = if lowest >= muster_core::LEVEL_ARCHIVE_ENDED {
            lowest
        } else {
            1
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline
            && self
                .running()
                .any(|n| n.raft.state.read().state.cluster_level() < founded_at)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node = self
            .running()
            .next()
            .ok_or_else(|| crate::bootstrap::BootstrapError::Refused("no node runs".into()))?;
        crate::bootstrap::ensure_root(&node.raft, dir, &self.scope).await
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }
}
