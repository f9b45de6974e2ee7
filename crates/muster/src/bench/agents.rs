//! The bench's simulated agents: tasks that speak AgentService as `muster agent` does,
//! without running anything.

use super::*;

/// How long a simulated agent waits for one report to be answered.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// The simulated agents: tasks that speak AgentService like `muster agent` does, without
/// running anything. They run on their own threads: real agents run on other machines, and
/// sharing the control nodes' worker threads let ten thousand of them hold up Raft's
/// heartbeats behind their own work, where the OS now shares the cores between the two.
pub(super) struct Agents {
    pub(super) stop: tokio::sync::watch::Sender<bool>,
    pub(super) tally: Arc<Tally>,
    pub(super) runtime: Option<tokio::runtime::Runtime>,
}

/// What all simulated agents have seen, together.
#[derive(Default)]
pub(super) struct Tally {
    /// Attempts handed to an agent: each was committed by a `Place` before it was streamed.
    pub(super) placed: AtomicU64,
    /// Attempts whose exit report was committed.
    pub(super) ended: AtomicU64,
    /// Times an agent lost its control node (a failed register, watch or heartbeat, or an
    /// ended stream) and started over.
    pub(super) reconnects: AtomicU64,
    /// Assignment streams that delivered their first set: how far a fleet has come back
    /// after a failover.
    pub(super) streams_opened: AtomicU64,
    /// Report calls that failed or timed out (each is retried).
    pub(super) report_failures: Arc<AtomicU64>,
}

impl Agents {
    pub(super) fn start(cluster: &LocalCluster, args: &BenchArgs) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("sim-agent")
            .enable_all()
            .build()?;
        // A channel's connection is driven by a task on the runtime it is made on: made here,
        // the agents' side of every call would run on the control nodes' threads.
        let entered = runtime.enter();
        let addrs = Arc::new(cluster.grpc_addrs());
        // As the real agent's reporter sets them: a call that hangs fails.
        let endpoint = |addr: &str| -> anyhow::Result<Endpoint> {
            Ok(Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(REPORT_TIMEOUT)
                .http2_adaptive_window(true))
        };
        let per_connection = args.agents_per_connection.max(1);
        let connections = args.agents.div_ceil(per_connection);
        let mut pools: Vec<Vec<Channel>> = Vec::new();
        if !args.tls {
            for addr in addrs.iter() {
                let mut pool = Vec::new();
                for _ in 0..connections {
                    pool.push(endpoint(addr)?.connect_lazy());
                }
                pools.push(pool);
            }
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tally = Arc::new(Tally::default());
        for i in 0..args.agents {
            let id = format!("sim-{i:05}");
            let channels: Vec<Channel> = if args.tls {
                // Its own certificate, and its own connection to each node, as a real agent.
                let files = cluster.agent_tls(&id)?.context("the cluster runs TLS")?;
                let tls = muster_tls::Identity::load("tls", &files)?
                    .client_tls(muster_tls::CONTROL_SERVER_NAME)
                    .with_connect_timeout(Duration::from_secs(5));
                addrs
                    .iter()
                    .map(|addr| Ok(tls.connect_lazy(endpoint(addr)?)))
                    .collect::<anyhow::Result<_>>()?
            } else {
                pools
                    .iter()
                    .map(|p| p[i / per_connection].clone())
                    .collect()
            };
            // Racks of 32 agents, blocks of 32 racks: where gangs find their tightest domain.
            let topology = format!("block=b{}/rack=r{}", i / 1024, i / 32);
            let agent = SimAgent {
                id,
                topology,
                channels,
                addrs: addrs.clone(),
                vcpus: args.agent_vcpus,
                job_millis: args.job_millis,
                tally: tally.clone(),
            };
            runtime.spawn(agent.run(stopped.clone()));
        }
        drop(entered);
        Ok(Agents {
            stop,
            tally,
            runtime: Some(runtime),
        })
    }

    pub(super) fn stop(self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which async code must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct SimAgent {
    id: String,
    /// The `topology` label it reports.
    topology: String,
    /// One channel per control node, and the node's address.
    channels: Vec<Channel>,
    addrs: Arc<Vec<String>>,
    vcpus: u64,
    job_millis: u64,
    tally: Arc<Tally>,
}

impl SimAgent {
    fn inventory(&self) -> pb::Inventory {
        pb::Inventory {
            capacity: Some(pb::Resources {
                millicpus: self.vcpus * 1000,
                memory_mib: self.vcpus * 4096,
                gpus: 0,
            }),
            hostname: self.id.clone(),
            address: "127.0.0.1".into(),
            executor: "simulated".into(),
            gpus: Vec::new(),
            labels: [("topology".to_owned(), self.topology.clone())].into(),
            log_address: String::new(),
        }
    }

    /// As `muster agent` does: registers once, then watches its assignments at the leader
    /// (following the leader hint a follower answers with) and registers again only when a
    /// control node no longer knows it. Unlike it, heartbeats only the node it watches (a
    /// real agent heartbeats every control node: three calls where this makes one), after
    /// one call to every node at its start that makes its connections.
    async fn run(self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let this = Arc::new(self);
        // Once to every control node, so that its connection to each is made (and kept,
        // pinged while idle) as the real agent's heartbeats to every node keep them: at a
        // failover the new leader then meets connections, not a thousand TLS handshakes.
        let mut beats = tokio::task::JoinSet::new();
        for channel in &this.channels {
            let beat = pb::HeartbeatRequest {
                node_id: this.id.clone(),
                inventory: None,
                unhealthy: None,
            };
            let mut client = AgentServiceClient::new(channel.clone());
            beats.spawn(async move { drop(client.heartbeat(beat).await) });
        }
        beats.join_all().await;
        let channels = this.channels.clone();
        let reporter = Reporter::spawn(
            &this.id,
            move || channels.clone(),
            this.tally.report_failures.clone(),
            stopped.clone(),
        );
        let mut seen: HashSet<(String, u32)> = HashSet::new();
        let mut node = 0usize;
        let mut registered = false;
        let mut backoff = Backoff::for_control_plane(&this.id);
        loop {
            if *stopped.borrow() {
                return;
            }
            let mut client = AgentServiceClient::new(this.channels[node].clone());
            if !registered {
                let register = pb::RegisterRequest {
                    node_id: this.id.clone(),
                    compute_environment: "bench".into(),
                    inventory: Some(this.inventory()),
                };
                if client.register(register).await.is_err() {
                    this.tally.reconnects.fetch_add(1, Ordering::Relaxed);
                    node = (node + 1) % this.channels.len();
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                registered = true;
            }
            let watch = pb::WatchRequest {
                node_id: this.id.clone(),
            };
            let mut stream = match client.watch_assignments(watch).await {
                Ok(watch) => watch.into_inner(),
                Err(status) => {
                    this.tally.reconnects.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.failing();
                    let delay = backoff.next_delay();
                    match this.leader_hint(&status) {
                        Some(leader) if !pause => node = leader,
                        hint => {
                            node = hint.unwrap_or((node + 1) % this.channels.len());
                            tokio::time::sleep(delay).await;
                        }
                    }
                    continue;
                }
            };
            let mut beat = tokio::time::interval(Duration::from_secs(5));
            let mut first_set = true;
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = beat.tick() => {
                        let beat = pb::HeartbeatRequest { node_id: this.id.clone(), inventory: None, unhealthy: None };
                        match client.heartbeat(beat).await {
                            Ok(_) => {}
                            Err(status) => {
                                registered = status.code() != tonic::Code::NotFound;
                                break;
                            }
                        }
                    }
                    message = stream.message() => {
                        let Ok(Some(set)) = message else { break };
                        backoff.reset();
                        if std::mem::take(&mut first_set) {
                            this.tally.streams_opened.fetch_add(1, Ordering::Relaxed);
                        }
                        // Jobs that end at once are reported from here, their exits awaited
                        // by one task per set rather than one task per attempt: the agents
                        // share the machine with the cluster they load.
                        let mut exits = Vec::new();
                        // Each set is every attempt placed here now: one that left it has
                        // ended and is never placed again, so it is forgotten (a memory
                        // measurement of a million ended jobs must not count the agents'
                        // own record of them).
                        let current: HashSet<(&str, u32)> =
                            set.assignments.iter().map(|a| (a.job_id.as_str(), a.attempt)).collect();
                        seen.retain(|(job, attempt)| current.contains(&(job.as_str(), *attempt)));
                        for a in set.assignments {
                            if !seen.insert((a.job_id.clone(), a.attempt)) {
                                continue;
                            }
                            this.tally.placed.fetch_add(1, Ordering::Relaxed);
                            drop(reporter.report(&a.job_id, a.attempt, ReportEvent::Running));
                            if this.job_millis == 0 {
                                exits.push(reporter.report(&a.job_id, a.attempt, EXITED_0));
                            } else {
                                tokio::spawn(this.clone().finish_attempt(reporter.clone(), a.job_id, a.attempt));
                            }
                        }
                        if !exits.is_empty() {
                            let tally = this.tally.clone();
                            tokio::spawn(async move {
                                for delivered in exits {
                                    if delivered.await {
                                        tally.ended.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            });
                        }
                    }
                }
            }
            this.tally.reconnects.fetch_add(1, Ordering::Relaxed);
            node = (node + 1) % this.channels.len();
        }
    }

    /// Which control node a refusal named as the leader.
    fn leader_hint(&self, status: &tonic::Status) -> Option<usize> {
        let hint = status
            .metadata()
            .get(muster_proto::LEADER_METADATA_KEY)?
            .to_str()
            .ok()?;
        self.addrs.iter().position(|a| a == hint)
    }

    /// As the real agent: RUNNING is queued when the attempt starts (by the caller) and the
    /// exit when it ends, and the agent's reporter sends what is queued in order, in batches.
    async fn finish_attempt(self: Arc<Self>, reporter: Reporter, job_id: String, attempt: u32) {
        tokio::time::sleep(Duration::from_millis(self.job_millis)).await;
        if reporter.report(&job_id, attempt, EXITED_0).await {
            self.tally.ended.fetch_add(1, Ordering::Relaxed);
        }
    }
}
