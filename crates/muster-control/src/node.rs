//! Starting and stopping one control node.

use crate::{AgentGateway, RaftPlane, ServerConfig, scheduler};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use muster_api::ApiConfig;
use muster_proto::pb::agent_service_server::AgentServiceServer;
use muster_proto::pb::raft_service_server::RaftServiceServer;
use muster_raft::{PeerDirectory, PeerNetwork, Raft, RaftGrpc, RaftNode, StateMachine};
use muster_store::{SledLogStore, SledSnapshotStore, open_sled_waiting};
use muster_tls::ClientCertificates;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The API's listener when it serves HTTPS.
struct HttpsListener(muster_tls::transport::TlsListener);

impl axum::serve::Listener for HttpsListener {
    type Io = muster_tls::transport::ServerTlsStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl std::future::Future<Output = (Self::Io, Self::Addr)> + Send {
        self.0.accept()
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

/// Listeners bound by the caller (port 0 in tests).
pub struct Listeners {
    /// Agents.
    pub grpc: TcpListener,
    /// The other control nodes (Raft).
    pub raft: TcpListener,
    /// The AWS Batch API.
    pub api: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the data directory {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("raft failed to start: {0}")]
    Raft(String),
    #[error(
        "the data directory {path} has {free_mib} MiB free; a control node needs at least {} MiB to start",
        MIN_FREE_DISK_BYTES / (1024 * 1024)
    )]
    DiskFull { path: String, free_mib: u64 },
    #[error("listener has no local address: {0}")]
    Listener(std::io::Error),
    #[error("cannot start the Raft threads: {0}")]
    Threads(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running control node. Dropping it stops its servers, loops and Raft without waiting for
/// them; [`ControlNode::shutdown`] stops them in order and waits.
pub struct ControlNode {
    pub raft: RaftNode,
    pub grpc_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// Flipped to `true` once to stop every loop and server of this node.
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Resolves once the Raft threads have stopped and dropped what they held.
    raft_threads_stopped: oneshot::Receiver<()>,
}

impl ControlNode {
    pub async fn start(
        config: ServerConfig,
        listeners: Listeners,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, StartError> {
        let grpc_addr = listeners.grpc.local_addr().map_err(StartError::Listener)?;
        let raft_addr = listeners.raft.local_addr().map_err(StartError::Listener)?;
        let api_addr = listeners.api.local_addr().map_err(StartError::Listener)?;
        let raft_dir = config.data_dir.join("raft");
        let storage_err = |source| StartError::Storage {
            path: raft_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&raft_dir).map_err(storage_err)?;
        // Opening the store writes to it (sled's recovery): never on a full disk, where a
        // write cut short can leave it unreadable. A supervisor restarting this node after its
        // disk filled gets this error until there is room again.
        let free = free_bytes(&raft_dir).map_err(storage_err)?;
        if free < MIN_FREE_DISK_BYTES {
            return Err(StartError::DiskFull {
                path: raft_dir.display().to_string(),
                free_mib: free / (1024 * 1024),
            });
        }
        let db = open_sled_waiting(&raft_dir).await.map_err(storage_err)?;
        let snapshots = SledSnapshotStore::new(&db).map_err(storage_err)?;
        let log = SledLogStore::new(&db)
            .map_err(storage_err)?
            .bounded_by(snapshots.purge_bound());
        let archive = muster_raft::EndedJobs::new(
            muster_store::ArchiveStore::open(&config.data_dir.join("archive"))
                .await
                .map_err(storage_err)?,
        );
        let spool = muster_raft::SnapshotSpool::in_dir(&config.data_dir.join("snapshot-spool"))
            .map_err(storage_err)?;
        let state_machine = StateMachine::open(snapshots, archive, spool)
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let state = state_machine.handle();

        // TCP and TLS within a second: a peer that takes longer is as good as down for Raft,
        // and the next call tries again.
        let peers_tls = config.tls.as_ref().map(|identity| {
            identity
                .client_tls(muster_tls::CONTROL_SERVER_NAME)
                .with_connect_timeout(Duration::from_secs(1))
        });
        let agent_logs_tls = config
            .tls
            .as_ref()
            .map(|identity| identity.client_tls(muster_tls::AGENT_SERVER_NAME));
        let peers = match &peers_tls {
            Some(tls) => PeerDirectory::with_tls(tls.clone()),
            None => PeerDirectory::default(),
        };
        let tls_error = |e: muster_tls::IdentityError| StartError::Tls(e.to_string());
        // Peers must present a certificate at the handshake; agents may come without one to
        // join, and are then refused every other call. Both present a certificate that a
        // renewal replaces (`renewal.rs`).
        let renewable = |clients| match &config.tls {
            Some(id) => id
                .renewable_server_config(clients)
                .map(|(tls, served)| (Some(tls), Some(served)))
                .map_err(tls_error),
            None => Ok((None, None)),
        };
        let (raft_tls, raft_cert) = renewable(ClientCertificates::Required)?;
        let (agents_tls, agents_cert) = renewable(ClientCertificates::Optional)?;
        for (id, addrs) in &config.peers {
            peers.set(*id, addrs.clone());
        }
        let raft_config =
            muster_raft::raft_config(&config.cluster_name, config.snapshot_every_entries)
                .validate()
                .map_err(|e| StartError::Raft(e.to_string()))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (raft_runtime, raft_threads_stopped) =
            start_raft_threads(config.node_id, shutdown_rx.clone()).map_err(StartError::Threads)?;
        // Raft::new spawns openraft's tasks on the runtime it is called on.
        let network = PeerNetwork::new(config.node_id, peers.clone());
        let raft = raft_runtime
            .spawn(Raft::new(
                config.node_id,
                Arc::new(raft_config),
                network,
                log,
                state_machine,
            ))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let mut node = RaftNode::new(config.node_id, raft.clone(), state, peers);
        node.command_level = config.command_level;

        let heartbeats = crate::liveness::Heartbeats::default();
        let mut tasks = Vec::new();

        // Elections: openraft's own are off (see `muster_raft::election`); this node stands
        // after a pre-vote, from the Raft runtime.
        raft_runtime.spawn(muster_raft::election::run_elections(
            raft.clone(),
            config.node_id,
            node.peers.clone(),
            node.contact.clone(),
            node.elections.clone(),
            muster_raft::election::jitter_seed(),
            shutdown_rx.clone(),
        ));
        let mut raft_service = RaftGrpc::new(node.clone());
        if config.tls.is_some() {
            raft_service = raft_service.control_nodes_only();
        }
        let raft_server = keepalive(tonic::transport::Server::builder(), Duration::from_secs(1))
            .add_service(
                RaftServiceServer::new(raft_service)
                    .max_decoding_message_size(muster_raft::MAX_RAFT_MESSAGE_BYTES)
                    .max_encoding_message_size(muster_raft::MAX_RAFT_MESSAGE_BYTES),
            );
        // The listener is handed over unregistered, so that its connections are driven by the
        // Raft runtime's own reactor.
        let raft_listener = listeners.raft.into_std().map_err(StartError::Listener)?;
        let stop = signal(shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            let served = raft_runtime.spawn(async move {
                let listener = TcpListener::from_std(raft_listener)?;
                match raft_tls {
                    Some(tls) => {
                        let incoming = muster_tls::transport::tls_incoming(listener, tls, "raft");
                        raft_server
                            .serve_with_incoming_shutdown(incoming, stop)
                            .await
                    }
                    None => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true));
                        raft_server
                            .serve_with_incoming_shutdown(incoming, stop)
                            .await
                    }
                }
                .map_err(std::io::Error::other)
            });
            match served.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Raft gRPC server failed"),
                // The Raft runtime was dropped under it: the node is stopping.
                Err(_) => {}
            }
        }));

        // Agents ping too; thousands of them each pinged every second would cost the leader.
        let grpc = keepalive(tonic::transport::Server::builder(), Duration::from_secs(5))
            .add_service(AgentServiceServer::new(
                AgentGateway::new(
                    node.clone(),
                    shutdown_rx.clone(),
                    heartbeats.clone(),
                    config.node_lost_after,
                )
                .authenticating_agents(config.tls.is_some())
                .signing_joins_with(config.ca.clone()),
            ));
        let stop = signal(shutdown_rx.clone());
        let grpc_listener = listeners.grpc;
        tasks.push(tokio::spawn(async move {
            let served = match agents_tls {
                Some(tls) => {
                    let incoming = muster_tls::transport::tls_incoming(grpc_listener, tls, "grpc");
                    grpc.serve_with_incoming_shutdown(incoming, stop).await
                }
                None => {
                    let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(true));
                    grpc.serve_with_incoming_shutdown(incoming, stop).await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        let mut router = muster_api::router(
            RaftPlane::new(node.clone(), config.limits).reading_logs_with(agent_logs_tls.clone()),
            &ApiConfig::default(),
        );
        if let Some(handle) = metrics {
            router = router.route("/metrics", get(move || std::future::ready(handle.render())));
        }
        router = router
            .route("/health", get(|| std::future::ready("ok\n")))
            .route("/ready", get(ready).with_state(node.clone()));
        let stop = signal(shutdown_rx.clone());
        let api = listeners.api;
        let api_tls = config.api_tls.clone();
        tasks.push(tokio::spawn(async move {
            let served = match api_tls {
                Some(tls) => match muster_tls::transport::TlsListener::new(api, tls, "api") {
                    Ok(listener) => {
                        axum::serve(HttpsListener(listener), router)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                    Err(e) => Err(e),
                },
                None => axum::serve(api, router).with_graceful_shutdown(stop).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "API server failed");
            }
        }));

        // A node that holds the CA's key renews its own certificate before it expires.
        if let (Some(identity), Some(files), Some(ca)) = (
            config.tls.clone(),
            config.tls_files.clone(),
            config.ca.clone(),
        ) {
            let presented = crate::renewal::Presented {
                servers: raft_cert.into_iter().chain(agents_cert).collect(),
                clients: peers_tls.into_iter().chain(agent_logs_tls).collect(),
            };
            tasks.push(tokio::spawn(crate::renewal::keep_renewed(
                config.node_id,
                files,
                identity,
                ca,
                presented,
                shutdown_rx.clone(),
            )));
        }

        tasks.extend(spawn_loops(
            &node,
            &heartbeats,
            config.node_lost_after,
            config.history,
            shutdown_rx.clone(),
        ));

        // The lowest-numbered voter founds the cluster, once: afterwards its log is not empty
        // and it restarts from its data directory like everyone else. The founder also makes
        // the first administrator and writes its key under `data_dir/aws`. A node started to
        // join a running cluster never founds one: it waits to be added (`muster cluster
        // add-node`).
        let founder =
            !config.join_existing_cluster && config.peers.keys().min() == Some(&config.node_id);
        if config.join_existing_cluster
            && !raft
                .is_initialized()
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?
        {
            tracing::info!(
                node = config.node_id,
                %raft_addr,
                "waiting to be added to the cluster: `muster cluster add-node --id {} --raft-addr … --grpc-addr … --api-addr …`",
                config.node_id
            );
        }

        let mut founded = false;
        if founder
            && !raft
                .is_initialized()
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?
        {
            let members: BTreeMap<u64, muster_raft::Member> = config
                .peers
                .iter()
                .map(|(id, addrs)| (*id, muster_raft::Member::from(addrs)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => founded = true,
                Err(e) => tracing::warn!(error = %e, "cluster initialisation refused"),
            }
        }
        // The founder names the cluster's region and account first, before anything gets an
        // ARN; then it makes the first administrator (`ensure_root` sets the scope too).
        if let Some(credentials_dir) = config.root_credentials_dir.clone()
            && (founded || (founder && credentials_dir.join("credentials").exists()))
        {
            let (node, scope) = (node.clone(), config.scope.clone());
            let with_defaults = config.found_with_defaults;
            let founding_token = config.founding_join_token.clone();
            tasks.push(tokio::spawn(async move {
                if founded {
                    crate::bootstrap::found_at_level(&node).await;
                }
                match crate::bootstrap::ensure_root(&node, &credentials_dir, &scope).await {
                    Ok(c) => tracing::info!(
                        access_key_id = %c.access_key_id,
                        path = %credentials_dir.join("credentials").display(),
                        "root credentials ready"
                    ),
                    Err(e) => tracing::error!(error = %e, "could not create the root user"),
                }
                if with_defaults && let Err(e) = crate::bootstrap::ensure_defaults(&node).await {
                    tracing::error!(error = %e, "could not create the default queue");
                }
                if let Some(token) = founding_token
                    && let Err(e) = crate::bootstrap::ensure_join_token(&node, &token).await
                {
                    tracing::error!(error = %e, "could not record the founding join token");
                }
            }));
        } else if founded {
            let (node, scope) = (node.clone(), config.scope.clone());
            tasks.push(tokio::spawn(async move {
                crate::bootstrap::found_at_level(&node).await;
                if let Err(e) = crate::bootstrap::set_scope(&node, &scope).await {
                    tracing::error!(error = %e, "could not set the cluster's region and account");
                }
            }));
        }
        tracing::info!(
            node = config.node_id,
            %grpc_addr,
            %raft_addr,
            %api_addr,
            "control node started"
        );
        Ok(Self {
            raft: node,
            grpc_addr,
            raft_addr,
            api_addr,
            shutdown,
            tasks,
            raft_threads_stopped,
        })
    }

    /// Resolves if this node's Raft stops on its own, with why: a storage failure (a full or
    /// failing disk) ends openraft's core, and a node in that state can neither vote nor
    /// replicate until it restarts from its data directory. `muster server` exits then, so
    /// that its supervisor restarts it once the disk has room again.
    ///
    /// A core that panics reports nothing: its metrics channel closes. This node still holds
    /// its Raft handle, so only the core can have ended it.
    pub async fn raft_failed(&self) -> String {
        let mut metrics = self.raft.raft.metrics();
        match metrics.wait_for(|m| m.running_state.is_err()).await {
            Ok(m) => match &m.running_state {
                Err(fatal) => fatal.to_string(),
                Ok(()) => unreachable!("waited for an error"),
            },
            Err(_) => "the Raft core ended without a report (it panicked)".to_string(),
        }
    }

    /// Stops Raft, then the servers and loops, and waits for all of it. The data directory
    /// is released when this returns. Raft goes first: a leader that keeps heartbeating
    /// while its servers drain only delays the election of its successor, and sends the
    /// agents that lose their streams back to it.
    pub async fn shutdown(self) {
        let Self {
            raft,
            shutdown,
            tasks,
            raft_threads_stopped,
            ..
        } = self;
        if let Err(e) = raft.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        let _ = shutdown.send(true);
        for task in tasks {
            // Servers stop accepting at once; open streams end with the shutdown signal.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        // The log and snapshot store are released with the Raft runtime's tasks.
        let _ = raft_threads_stopped.await;
        // Freeing a state of a million jobs takes seconds of CPU: on a thread of its own at the
        // lowest priority, so that the other nodes of this process (`muster dev`, tests, the
        // bench), electing a new leader meanwhile, get the cores first, as they would if this
        // node were a process the kernel had killed.
        let state = raft.state.clone();
        drop(raft);
        let (freed, done) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("free-state".into())
            .spawn(move || {
                lowest_priority_for_this_thread();
                drop(state);
                let _ = freed.send(());
            });
        if spawned.is_ok() {
            let _ = done.await;
        }
    }
}

/// Starts the threads Raft runs on: openraft's tasks (elections, replication, the log and
/// the state machine) and the server the other control nodes call. Under the load of
/// thousands of agents, a vote or heartbeat queued on the runtime that serves them waited
/// past its timeout and the cluster changed leader for nothing; on threads of their own, which
/// the kernel schedules beside that runtime's, they are answered in milliseconds. The runtime
/// lives until `shutdown` turns true (or its sender is dropped) and is dropped on its own
/// thread; the returned receiver resolves after that.
fn start_raft_threads(
    node_id: u64,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(tokio::runtime::Handle, oneshot::Receiver<()>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("raft-{node_id}"))
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stopped, raft_threads_stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("raft-{node_id}-owner"))
        .spawn(move || {
            runtime.block_on(signal(shutdown));
            drop(runtime);
            let _ = stopped.send(());
        })?;
    Ok((handle, raft_threads_stopped))
}

/// Publishes this node's view of Raft in `/metrics`, on every node, so that an operator (or
/// the chaos harness) can tell who leads without asking the API: `muster_raft_term`,
/// `muster_raft_leader` (the leader's id, 0 while none is known), `muster_raft_leading` (1
/// while this node leads with a quorum), `muster_raft_last_log_index` and
/// `muster_raft_applied_index`, each labelled with the node's id; and the jobs its replica
/// holds in memory (`muster_jobs_in_memory`) and ended jobs moved to its archive on disk
/// (`muster_jobs_archived`).
async fn report_raft_gauges(node: RaftNode, mut shutdown: watch::Receiver<bool>) {
    let id = node.id.to_string();
    let gauge = |name: &'static str| metrics::gauge!(name, "node" => id.clone());
    let (term, leader, leading, last_log, applied) = (
        gauge("muster_raft_term"),
        gauge("muster_raft_leader"),
        gauge("muster_raft_leading"),
        gauge("muster_raft_last_log_index"),
        gauge("muster_raft_applied_index"),
    );
    let (in_memory, archived) = (
        gauge("muster_jobs_in_memory"),
        gauge("muster_jobs_archived"),
    );
    loop {
        {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            term.set(m.current_term as f64);
            leader.set(m.current_leader.unwrap_or(0) as f64);
            last_log.set(m.last_log_index.unwrap_or(0) as f64);
            applied.set(m.last_applied.map_or(0, |l| l.index) as f64);
        }
        leading.set(if node.leads_with_quorum() { 1.0 } else { 0.0 });
        {
            let applied = node.state.read();
            in_memory.set(applied.state.job_count() as f64);
            archived.set(applied.state.ended_job_count() as f64);
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// `/ready`, for load balancers and health checks: `200` once this node knows a leader that
/// confirms it still leads and has applied what that leader had committed (a read index,
/// within two seconds); `503` saying why otherwise.
async fn ready(
    axum::extract::State(node): axum::extract::State<RaftNode>,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    match tokio::time::timeout(READY_WITHIN, node.read(|_| ())).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no leader confirmed a read within {READY_WITHIN:?}\n"),
        ),
    }
}

const READY_WITHIN: Duration = Duration::from_secs(2);

/// The room a control node needs on its data disk to start.
const MIN_FREE_DISK_BYTES: u64 = 64 * 1024 * 1024;

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is written by the call before it is read.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat.assume_init()
    };
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The loops every control node runs beside its servers, each until `shutdown`: the scheduler
/// and its plan applier, agent liveness and job housekeeping (which act only while this node
/// leads), and the Raft gauges. `node_lost_after` and `history` as in [`ServerConfig`].
pub fn spawn_loops(
    node: &RaftNode,
    heartbeats: &crate::Heartbeats,
    node_lost_after: Duration,
    history: crate::JobHistory,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(scheduler::run(
            node.clone(),
            Default::default(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::liveness::run(
            node.clone(),
            heartbeats.clone(),
            node_lost_after,
            shutdown.clone(),
        )),
        tokio::spawn(report_raft_gauges(node.clone(), shutdown.clone())),
        tokio::spawn(muster_raft::membership::follow_membership(
            node.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::housekeeping::run(node.clone(), history, shutdown)),
    ]
}

/// Both sides of every internal connection ping: a peer or agent that vanished without a reset
/// (stopped, cut off) is dropped within seconds, and what it sent before is not acted on
/// minutes later when TCP finally delivers it.
fn keepalive(server: tonic::transport::Server, every: Duration) -> tonic::transport::Server {
    server
        .http2_keepalive_interval(Some(every))
        .http2_keepalive_timeout(Some(every * 2))
}

async fn signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Lowers the calling thread's scheduling priority as far as it goes (Linux schedules threads
/// one by one, so this leaves the rest of the process as it was). Best effort: where it is
/// refused, the thread runs at the priority it had.
fn lowest_priority_for_this_thread() {
    // SAFETY: gettid and setpriority take no pointers and only affect this thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}
