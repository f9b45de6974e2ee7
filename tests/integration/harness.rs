//! A cluster under test: control nodes, agents, and clients, with deadlines for every wait.

use muster_agent::{Agent, ExecutorKind, RawAgentConfig};
use muster_client::BatchClient;
use muster_control::LocalCluster;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub cluster: LocalCluster,
    /// `stop_after_secs` of the agents added from now on.
    pub agent_stop_after_secs: u64,
    /// The root user's key, made when the cluster started.
    pub credentials: muster_client::Credentials,
    /// Each agent runs on a runtime of its own, so that killing it takes every task and
    /// process it started with it, as a crash of the agent's machine would.
    agents: Vec<(
        watch::Sender<bool>,
        JoinHandle<()>,
        Option<tokio::runtime::Runtime>,
    )>,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error")),
        )
        .with_test_writer()
        .try_init();
}

impl TestCluster {
    /// A cluster whose ended jobs move to the archive as soon as the leader looks (within a
    /// second), so that what tests read of ended jobs is read from the archive as well.
    pub async fn start(size: u64) -> TestCluster {
        Self::start_with_limits(size, Default::default()).await
    }

    pub async fn start_with_limits(size: u64, limits: muster_api::Limits) -> TestCluster {
        Self::start_tuned(
            size,
            muster_control::Tuning {
                limits,
                history: archive_at_once(),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn start_tuned(size: u64, tuning: muster_control::Tuning) -> TestCluster {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let region = tuning.scope.region.clone();
        let cluster = LocalCluster::start_tuned(
            dir.path(),
            size,
            "127.0.0.1:0".parse().unwrap(),
            None,
            tuning,
        )
        .await
        .expect("cluster starts");
        cluster
            .wait_for_leader(DEADLINE)
            .await
            .expect("a leader is elected");
        let root = cluster
            .ensure_root(&dir.path().join("aws"))
            .await
            .expect("root user");
        let credentials = muster_client::Credentials {
            access_key_id: root.access_key_id,
            secret_access_key: root.secret_access_key,
            region,
        };
        TestCluster {
            dir,
            cluster,
            credentials,
            agents: Vec::new(),
            agent_stop_after_secs: 20,
        }
    }

    /// A client of node `id`'s API.
    pub fn client(&self, id: u64) -> BatchClient {
        BatchClient::new(
            format!("http://{}", self.cluster.api_addr(id)),
            self.credentials.clone(),
        )
    }

    /// A gRPC client of node `id`'s agent service that holds the certificate of agent `agent`,
    /// for tests that speak the agent protocol by hand.
    pub async fn agent_client(
        &self,
        id: u64,
        agent: &str,
    ) -> muster_proto::pb::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
        let files = self
            .cluster
            .agent_tls(agent)
            .expect("agent certificate")
            .expect("the test cluster runs TLS");
        let identity = muster_tls::Identity::load("tls", &files).expect("agent identity");
        let addr = &self.cluster.grpc_addrs()[(id - 1) as usize];
        let channel = identity
            .client_tls(muster_tls::CONTROL_SERVER_NAME)
            .connect(muster_tls::ClientTls::endpoint(addr).unwrap())
            .await
            .expect("gRPC connects");
        muster_proto::pb::agent_service_client::AgentServiceClient::new(channel)
    }

    /// A client of some running node that is not the leader.
    pub fn follower_client(&self) -> BatchClient {
        let leader = self.cluster.leader();
        let follower = self
            .cluster
            .running()
            .map(|n| n.raft.id)
            .find(|id| Some(*id) != leader)
            .expect("a follower");
        self.client(follower)
    }

    /// Joins a process-executor agent offering `vcpus` and `memory_mib` to compute
    /// environment `ce`.
    pub async fn add_agent(&mut self, name: &str, ce: &str, vcpus: f64, memory_mib: u64) {
        let config = process_agent(
            name,
            ce,
            self.cluster.grpc_addrs(),
            self.dir.path().join(format!("agent-{name}")),
            (vcpus, memory_mib),
            self.agent_stop_after_secs,
            self.cluster.agent_tls(name).expect("agent certificate"),
        );
        let (stop, task, runtime) = start_agent(config).await;
        self.agents.push((stop, task, Some(runtime)));
    }

    /// Ends the `index`th agent as a crash would: its task and its processes die, and it
    /// reports nothing.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(runtime) = self.agents[index].2.take() {
            runtime.shutdown_background();
        }
    }

    /// The text of an attempt's output as the agent stored it, without the time stamps.
    pub fn agent_log(&self, agent: &str, job_id: &str, attempt: u32) -> String {
        let path = muster_agent::logs::attempt_log_path(
            &self.dir.path().join(format!("agent-{agent}")),
            job_id,
            attempt,
        );
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|line| line.split_once(' ').map_or(line, |(_, text)| text))
            .map(|text| format!("{text}\n"))
            .collect()
    }

    pub async fn shutdown(mut self) {
        for (stop, task, runtime) in self.agents.drain(..) {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            if let Some(runtime) = runtime {
                runtime.shutdown_background();
            }
        }
        self.cluster.shutdown().await;
    }
}

/// The config of a process-executor agent `name` in compute environment `ce` that reaches the
/// control plane at `control_plane`, offers `(vcpus, memory_mib)`, heartbeats every second and
/// stops its attempts after `stop_after_secs` cut off (sooner where the servers'
/// `node_lost_after` leaves less room: see `muster_agent::lease`), with 1 s of grace.
pub fn process_agent(
    name: &str,
    ce: &str,
    control_plane: Vec<String>,
    work_dir: std::path::PathBuf,
    (vcpus, memory_mib): (f64, u64),
    stop_after_secs: u64,
    tls: Option<muster_tls::TlsFiles>,
) -> muster_agent::AgentConfig {
    let mut config = RawAgentConfig {
        plaintext: tls.is_none(),
        tls,
        heartbeat_secs: 1,
        stop_grace_secs: 1,
        stop_after_secs,
        ..RawAgentConfig::new(name, ce, control_plane, ExecutorKind::Process, work_dir)
    }
    .validate()
    .expect("agent config");
    // Set past the config's check, which refuses to offer more than the machine has: tests
    // place jobs on agents larger than a two-core CI machine (what they run is tiny).
    config.vcpus_override = Some((vcpus * 1000.0).round() as u64);
    config.memory_override_mib = Some(memory_mib);
    config
}

/// Starts an agent on a runtime of its own, so that dropping the runtime takes every task and
/// process it started with it, as a crash of the agent's machine would.
pub async fn start_agent(
    config: muster_agent::AgentConfig,
) -> (watch::Sender<bool>, JoinHandle<()>, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("agent runtime");
    let agent = runtime
        .spawn(Agent::new(config))
        .await
        .expect("agent task")
        .expect("agent starts");
    let (stop, stopped) = watch::channel(false);
    let task = runtime.spawn(agent.run(stopped));
    (stop, task, runtime)
}

/// Creates compute environment `ce`, queue `queue` on it and definition `def` (1 vCPU,
/// 64 MiB, running `sh -c "exit 0"` unless overridden).
pub async fn create_basics(client: &BatchClient, ce: &str, queue: &str, def: &str) {
    ok(client
        .call(
            "CreateComputeEnvironment",
            json!({"computeEnvironmentName": ce, "type": "UNMANAGED"}),
        )
        .await);
    ok(client
        .call(
            "CreateJobQueue",
            json!({"jobQueueName": queue, "priority": 10, "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": ce}]}),
        )
        .await);
    ok(client
        .call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": def, "type": "container",
                   "containerProperties": {"image": "unused-by-process-executor", "command": ["sh", "-c", "exit 0"],
                                           "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "64"}]}}),
        )
        .await);
}

#[track_caller]
pub fn ok(result: Result<Value, muster_client::CallError>) -> Value {
    match result {
        Ok(v) => v,
        Err(e) => panic!("call failed: {e}"),
    }
}

pub async fn submit(
    client: &BatchClient,
    queue: &str,
    def: &str,
    name: &str,
    command: &[&str],
) -> String {
    let body = json!({"jobName": name, "jobQueue": queue, "jobDefinition": def,
                      "containerOverrides": {"command": command}});
    ok(client.call("SubmitJob", body).await)["jobId"]
        .as_str()
        .expect("jobId")
        .to_owned()
}

pub async fn describe(client: &BatchClient, job_id: &str) -> Option<Value> {
    let out = client
        .call("DescribeJobs", json!({"jobs": [job_id]}))
        .await
        .ok()?;
    out["jobs"].as_array()?.first().cloned()
}

/// Polls until the job's status is one of `statuses`; returns its description.
pub async fn wait_for_status(client: &BatchClient, job_id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(job) = describe(client, job_id).await {
            if statuses.contains(&job["status"].as_str().unwrap_or_default()) {
                return job;
            }
            last = Some(job);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("job {job_id} did not reach {statuses:?} within {DEADLINE:?}; last seen: {last:?}");
}

/// Waits until control node `node`'s replica holds `count` jobs in `queue`.
pub async fn wait_until_replica_holds(
    node: &muster_control::ControlNode,
    queue: &str,
    count: usize,
) {
    let deadline = Instant::now() + DEADLINE;
    while node.raft.state.read().state.job_count_in_queue(queue) < count {
        assert!(
            Instant::now() < deadline,
            "node {} never held {count} jobs in {queue}",
            node.raft.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ended jobs leave memory as soon as the leader looks; retention as by default.
pub fn archive_at_once() -> muster_control::JobHistory {
    muster_control::JobHistory {
        in_memory: Duration::ZERO,
        ..Default::default()
    }
}

/// Waits until `done` holds, checking every 50 ms, for at most [`DEADLINE`].
pub async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks every 50 ms for `within` that `happened` never holds: for what must not happen
/// (a deadline is all there is to wait for).
pub async fn never(what: &str, within: Duration, mut happened: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        assert!(!happened().await, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lets the wall clock pass `instant`, for tests whose premise is that a certificate (valid by
/// the wall clock) has expired: there is no condition to poll but time itself.
pub async fn outlive(instant: std::time::SystemTime) {
    if let Ok(left) = instant.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(100)).await;
    }
}
