//! `muster bench`: a real three-node cluster (sled on disk, gRPC between nodes) in this
//! process, driven through the signed AWS Batch API, with simulated agents that speak the
//! real agent protocol: they register, heartbeat, watch their assignments, and report each
//! attempt RUNNING and then SUCCEEDED after `--job-millis`. Prints one Markdown table row per
//! measurement, for BENCHMARKS.md. A benchmark, not a test: it asserts nothing.

use anyhow::Context;
use muster_agent::backoff::Backoff;
use muster_agent::reporter::{Event as ReportEvent, Reporter};
use muster_client::{BatchClient, Credentials};
use muster_control::LocalCluster;
use muster_core::State;
use muster_proto::pb;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

mod agents;
use agents::{Agents, Tally};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// vCPUs each simulated agent offers (jobs take 1 vCPU each).
    #[arg(long, default_value_t = 8)]
    pub agent_vcpus: u64,
    /// Jobs for the placement run, submitted as arrays of up to 10,000.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: u64,
    /// How long a simulated job runs before it reports success.
    #[arg(long, default_value_t = 0)]
    pub job_millis: u64,
    /// Jobs queued (never placed) for the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub queued_jobs: u64,
    /// Seconds of SubmitJob load, and concurrent clients producing it.
    #[arg(long, default_value_t = 10)]
    pub submit_secs: u64,
    #[arg(long, default_value_t = 64)]
    pub submit_clients: usize,
    /// Where the control nodes keep their sled databases (a fresh temporary one by default).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Mutual TLS on every internal port, as a real cluster runs: each simulated agent holds
    /// a certificate of its own and its own connection to each control node.
    #[arg(long)]
    pub tls: bool,
    /// Without --tls: simulated agents per shared connection to each control node (see
    /// `AGENTS_PER_CONNECTION`); 1 gives each its own, as with --tls.
    #[arg(long, default_value_t = AGENTS_PER_CONNECTION)]
    pub agents_per_connection: usize,
    /// Control nodes in the cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub control_nodes: u64,
    /// Also measure operations on the loaded state: a snapshot file saved, checked and
    /// restored, and a new control node caught up and made a voter, each with the peak of the
    /// process's resident memory meanwhile (with --ended-jobs too, after its measurements).
    #[arg(long)]
    pub operations: bool,
    /// Also measure multi-node gangs: SubmitJob to every node placed for gangs of 64 and 512
    /// nodes (20 of each, one at a time), and the placement run again with gangs waiting in a
    /// lower-priority queue of the same agents.
    #[arg(long)]
    pub gangs: bool,
    /// Measure only ended jobs: run this many to their end (as arrays of up to 10,000, with
    /// at most 100,000 waiting at a time), then the resident memory each ended job costs and
    /// the latency of DescribeJobs and ListJobs served from the archive.
    #[arg(long, default_value_t = 0)]
    pub ended_jobs: u64,
    /// Seconds an ended job stays in memory before the leader moves it to the archive (the
    /// server setting `ended_jobs_in_memory_secs`; 0: as soon as the leader looks).
    #[arg(long, default_value_t = muster_control::DEFAULT_ENDED_JOBS_IN_MEMORY.as_secs())]
    pub ended_jobs_in_memory_secs: u64,
}

/// Simulated agents share a gRPC connection to each control node this many at a time (a real
/// agent has its own). Many more per connection, and the answers to their reports arrive
/// faster than two cores let their tasks read them: h2 counts each small unread DATA frame
/// against a per-connection budget and closes the connection when it runs out
/// (`GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"`), which with 312 agents per connection
/// broke every stream on it, over and over, until the leader declared the agents lost.
const AGENTS_PER_CONNECTION: usize = 4;
const ARRAY_MAX: u64 = 10_000;
/// How every simulated job ends.
const EXITED_0: ReportEvent = ReportEvent::Exited {
    exit_code: Some(0),
    reason: None,
};

/// One batch of jobs run to their end (`Bench::end_jobs`).
struct EndedRun {
    submitted: u64,
    /// Jobs ended, array parents included.
    ended: u64,
    /// Each array's id and size.
    arrays: Vec<(String, u64)>,
    took: Duration,
    stored: Duration,
}

struct Bench {
    cluster: LocalCluster,
    clients: Vec<BatchClient>,
    tally: Arc<Tally>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let temp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    // Without --tls the simulated agents share connections (see `AGENTS_PER_CONNECTION`),
    // which certificates naming one agent each do not allow.
    anyhow::ensure!(
        (1..=9).contains(&args.control_nodes),
        "--control-nodes: 1 to 9"
    );
    let cluster = LocalCluster::start_tuned(
        &data_dir,
        args.control_nodes,
        "127.0.0.1:0".parse()?,
        None,
        muster_control::Tuning {
            tls: args.tls,
            history: muster_control::JobHistory {
                in_memory: Duration::from_secs(args.ended_jobs_in_memory_secs),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    cluster.wait_for_leader(Duration::from_secs(15)).await?;
    let root = cluster.ensure_root(&data_dir.join("aws")).await?;
    let clients = (1..=args.control_nodes)
        .map(|id| {
            BatchClient::new(
                format!("http://{}", cluster.api_addr(id)),
                Credentials {
                    access_key_id: root.access_key_id.clone(),
                    secret_access_key: root.secret_access_key.clone(),
                    region: "us-east-1".into(),
                },
            )
        })
        .collect();
    let mut bench = Bench {
        cluster,
        clients,
        tally: Default::default(),
    };
    bench.setup().await?;

    println!(
        "machine: {} logical CPUs, calibration {} ms; {} simulated agents × {} vCPU",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        calibration_ms(),
        args.agents,
        args.agent_vcpus
    );
    println!("| measurement | result |");
    println!("|---|---|");

    let agents = Agents::start(&bench.cluster, &args)?;
    bench.tally = agents.tally.clone();
    bench.wait_for_nodes(args.agents).await?;
    if args.ended_jobs > 0 {
        bench.ended(&args, &data_dir).await?;
        if args.operations {
            bench.settle().await?;
            bench.operations(&data_dir, &args).await?;
        }
        agents.stop();
        bench.cluster.shutdown().await;
        return Ok(());
    }
    bench.latency().await?;
    bench.memory(&args).await?;
    // The followers apply the queued jobs before a snapshot is written beside them (see
    // BENCHMARKS.md: a leader writing a million-job snapshot while its followers were still
    // applying lost its quorum).
    bench.settle().await?;
    if args.operations {
        bench.operations(&data_dir, &args).await?;
        bench.settle().await?;
    }
    bench.snapshot().await?;
    bench.placements(&args, "").await?;
    if args.gangs {
        bench.settle().await?;
        bench.gang_latency(64).await?;
        bench.gang_latency(512).await?;
        bench.settle().await?;
        bench.placements_beside_gangs(&args).await?;
    }
    // Each measurement starts with every follower caught up, so that one phase's
    // replication backlog is not billed to the next.
    bench.settle().await?;
    bench.submit_rate(&args).await?;
    bench.settle().await?;
    bench.failover(args.agents).await?;
    agents.stop();
    bench.cluster.shutdown().await;
    Ok(())
}

impl Bench {
    fn leader_state<R>(&self, f: impl FnOnce(&State) -> R) -> Option<R> {
        let leader = self.cluster.leader()?;
        let node = self.cluster.node(leader)?;
        Some(f(&node.raft.state.read().state))
    }

    /// Waits until every running node has applied what the leader has.
    async fn settle(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let applied: Vec<u64> = self
                .cluster
                .running()
                .map(|n| *n.raft.state.applied_index().borrow())
                .collect();
            if applied.iter().min() == applied.iter().max() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "followers did not catch up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn client(&self) -> &BatchClient {
        let leader = self.cluster.leader().unwrap_or(1);
        &self.clients[(leader - 1) as usize]
    }

    async fn call(&self, op: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.client()
            .call(op, body)
            .await
            .with_context(|| format!("{op} failed"))
    }

    async fn setup(&self) -> anyhow::Result<()> {
        for ce in ["bench", "parked"] {
            self.call(
                "CreateComputeEnvironment",
                json!({"computeEnvironmentName": ce, "type": "UNMANAGED"}),
            )
            .await?;
        }
        for (queue, ce, priority) in [
            ("bench", "bench", 1),
            ("parked", "parked", 1),
            ("gangs", "bench", 0),
        ] {
            self.call(
                "CreateJobQueue",
                json!({"jobQueueName": queue, "priority": priority,
                       "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": ce}]}),
            )
            .await?;
        }
        self.call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": "sim-gang", "type": "multinode",
                   "nodeProperties": {"numNodes": 2, "mainNode": 0, "nodeRangeProperties": [
                       {"targetNodes": ":", "container": {"image": "simulated", "command": ["true"],
                                                           "vcpus": 1, "memory": 16}}]}}),
        )
        .await?;
        self.call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": "sim", "type": "container",
                   "containerProperties": {"image": "simulated", "command": ["true"],
                                           "vcpus": 1, "memory": 16}}),
        )
        .await?;
        Ok(())
    }

    async fn wait_for_nodes(&self, count: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let ready = self.leader_state(|s| s.nodes().count()).unwrap_or(0);
            if ready >= count {
                row(
                    &format!("{count} simulated agents registered"),
                    &format!("{:.1} s", started.elapsed().as_secs_f64()),
                );
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "only {ready} of {count} agents registered"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn submit(&self, queue: &str, size: u64) -> anyhow::Result<String> {
        let mut body = json!({"jobName": "sim", "jobQueue": queue, "jobDefinition": "sim"});
        if size > 1 {
            body["arrayProperties"] = json!({"size": size});
        }
        let answer = self.call("SubmitJob", body).await?;
        Ok(answer["jobId"].as_str().unwrap_or_default().to_owned())
    }

    /// Submit→RUNNING on an idle cluster, one job at a time, from the jobs' own timestamps.
    async fn latency(&self) -> anyhow::Result<()> {
        let mut samples = Vec::new();
        for _ in 0..200 {
            let id = self.submit("bench", 1).await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let times = self.leader_state(|s| {
                    s.find_job(&muster_core::JobId::from(id.clone()))
                        .and_then(|j| Some((j.created_at.0, j.started_at?.0)))
                });
                if let Some(Some((created, started))) = times {
                    samples.push(started.saturating_sub(created));
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "job {id} never ran");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
        row(
            "submit→RUNNING, idle cluster (createdAt→startedAt, 200 jobs)",
            &format!("p50 {} ms, p99 {} ms", pct(0.5), pct(0.99)),
        );
        Ok(())
    }

    async fn submit_gang(&self, queue: &str, nodes: u32) -> anyhow::Result<String> {
        let body = json!({"jobName": "gang", "jobQueue": queue, "jobDefinition": "sim-gang",
                          "nodeOverrides": {"numNodes": nodes}});
        let answer = self.call("SubmitJob", body).await?;
        Ok(answer["jobId"].as_str().unwrap_or_default().to_owned())
    }

    /// SubmitJob of a gang of `nodes` to every node placed, on an idle cluster, 20 gangs one
    /// after the other (each ended before the next).
    async fn gang_latency(&self, nodes: u32) -> anyhow::Result<()> {
        let mut samples = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let id = muster_core::JobId::from(self.submit_gang("bench", nodes).await?);
            let deadline = started + Duration::from_secs(60);
            let status = |s: &State| s.find_job(&id).map(|j| j.status);
            // Placed once it has left the line (STARTING: every node holds its worker).
            let waiting = |s: Option<muster_core::JobStatus>| {
                s.is_none_or(|s| s < muster_core::JobStatus::Starting)
            };
            while waiting(self.leader_state(status).flatten()) {
                anyhow::ensure!(Instant::now() < deadline, "gang {id} never placed");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            loop {
                if self
                    .leader_state(status)
                    .flatten()
                    .is_some_and(|s| s.is_terminal())
                {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "gang {id} never ended");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        samples.sort_by(f64::total_cmp);
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
        row(
            &format!("SubmitJob → all {nodes} nodes of a gang placed, idle cluster (20 gangs)"),
            &format!("p50 {:.0} ms, p99 {:.0} ms", pct(0.5), pct(0.99)),
        );
        Ok(())
    }

    /// The placement run again, with 20 gangs of 64 nodes submitted to a lower-priority queue
    /// of the same agents as soon as the single jobs are: they wait while single jobs are
    /// waiting, and every round looks for room for them (and reserves it for the first).
    async fn placements_beside_gangs(&self, args: &BenchArgs) -> anyhow::Result<()> {
        let gangs = self
            .placements(args, " with 20 gangs of 64 nodes waiting")
            .await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        for id in gangs {
            let id = muster_core::JobId::from(id);
            while !self
                .leader_state(|s| s.find_job(&id).is_some_and(|j| j.status.is_terminal()))
                .unwrap_or(false)
            {
                anyhow::ensure!(Instant::now() < deadline, "gang {id} never ended");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Placements committed per second while `args.jobs` jobs drain through the agents. With
    /// a `label`, 20 gangs of 64 nodes join the lower-priority queue `gangs` once the jobs are
    /// submitted; their ids are returned.
    async fn placements(&self, args: &BenchArgs, label: &str) -> anyhow::Result<Vec<String>> {
        let before = self.placed_so_far();
        let resident_before = resident_kib();
        let started = Instant::now();
        let mut left = args.jobs;
        while left > 0 {
            let size = left.min(ARRAY_MAX);
            self.submit("bench", if size == 1 { 2 } else { size })
                .await?;
            left -= size;
        }
        let submitted = started.elapsed();
        let mut gangs = Vec::new();
        if !label.is_empty() {
            for _ in 0..20 {
                gangs.push(self.submit_gang("gangs", 64).await?);
            }
        }
        let gang_placed = |s: &State| {
            gangs
                .iter()
                .filter(|id| {
                    s.find_job(&muster_core::JobId::from(id.as_str()))
                        .is_some_and(|j| j.status >= muster_core::JobStatus::Starting)
                })
                .count()
        };
        let mut gangs_placed_early = 0;
        let (mut all_placed, mut all_done) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut progress = Instant::now();
        while all_done.is_none() {
            let (placed, done) = self.placed_so_far();
            if all_placed.is_none() && placed - before.0 >= args.jobs {
                all_placed = Some(started.elapsed());
                gangs_placed_early = self.leader_state(gang_placed).unwrap_or(0);
            }
            if done - before.1 >= args.jobs {
                all_done = Some(started.elapsed());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "placed {placed}, done {done} after 30 min"
            );
            if progress.elapsed() >= Duration::from_secs(10) {
                progress = Instant::now();
                eprintln!(
                    "bench: {:.0} s: {} placed, {} done of {}; {}",
                    started.elapsed().as_secs_f64(),
                    placed - before.0,
                    done - before.1,
                    args.jobs,
                    self.health()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resident_after = resident_kib();
        let placed = all_placed.unwrap_or_default().as_secs_f64();
        let done = all_done.unwrap_or_default().as_secs_f64();
        row(
            &format!(
                "{} jobs (arrays of ≤10,000) on {} agents{label}: submitted / all placed / all SUCCEEDED",
                args.jobs, args.agents
            ),
            &format!(
                "{:.1} s / {placed:.1} s / {done:.1} s",
                submitted.as_secs_f64()
            ),
        );
        row(
            &format!("placements committed per second (jobs ÷ time to all placed){label}"),
            &format!("{:.0}/s", args.jobs as f64 / placed),
        );
        if !gangs.is_empty() {
            row(
                "gangs placed before the last single job was (they wait behind a higher-priority queue)",
                &format!("{gangs_placed_early} of {}", gangs.len()),
            );
        }
        row(
            "attempt reports committed (RUNNING + exit per job ÷ time to all SUCCEEDED)",
            &format!("{:.0}/s", 2.0 * args.jobs as f64 / done),
        );
        // Ended jobs stay in the state for the retention period (7 days by default), so what
        // one costs bounds how many a cluster can keep describing. Below half a million jobs
        // the growth is lost among buffers the earlier phases freed or still hold.
        let per_job = resident_after.saturating_sub(resident_before) as f64 * 1024.0
            / args.jobs as f64
            / args.control_nodes as f64;
        row(
            "resident memory per SUCCEEDED job per control node (growth over the run)",
            &if args.jobs >= 500_000 {
                format!(
                    "{per_job:.0} B (process RSS {} → {} MiB)",
                    resident_before / 1024,
                    resident_after / 1024
                )
            } else {
                "not measured below 500,000 jobs".to_owned()
            },
        );
        Ok(gangs)
    }

    /// One line on the cluster's health for the progress report: the leader and its term,
    /// what it thinks of the agents and the bench queue, and the agents' failed calls.
    fn health(&self) -> String {
        let leader = self.cluster.leader();
        let view = self.leader_state(|s| {
            let ready = s
                .nodes()
                .filter(|n| n.status == muster_core::NodeStatus::Ready)
                .count();
            (ready, s.nodes().count(), s.runnable_count("bench"))
        });
        let term = leader
            .and_then(|l| self.cluster.node(l))
            .map(|n| n.raft.leader().1);
        let (ready, nodes, runnable) = view.unwrap_or_default();
        let views: Vec<String> = self
            .cluster
            .running()
            .map(|n| {
                let m = n.raft.raft.metrics().borrow().clone();
                format!(
                    "{}:{:?}/t{}/l{:?}/a{}",
                    n.raft.id,
                    m.state,
                    m.current_term,
                    m.current_leader,
                    m.last_applied.map_or(0, |l| l.index)
                )
            })
            .collect();
        format!(
            "[{}] leader {leader:?} term {term:?}; {ready}/{nodes} agents ready; {runnable} runnable; \
             {} reconnects, {} failed reports",
            views.join(" "),
            self.tally.reconnects.load(Ordering::Relaxed),
            self.tally.report_failures.load(Ordering::Relaxed)
        )
    }

    /// (attempts the agents were handed, attempts whose exit was committed) so far. Counted
    /// by the agents, not by scanning the leader's jobs: a scan of a million jobs every
    /// 100 ms held the state lock the scheduler and apply need, and was most of the CPU.
    fn placed_so_far(&self) -> (u64, u64) {
        (
            self.tally.placed.load(Ordering::Relaxed),
            self.tally.ended.load(Ordering::Relaxed),
        )
    }

    /// SubmitJob requests per second through the HTTP API, signed, from concurrent clients.
    async fn submit_rate(&self, args: &BenchArgs) -> anyhow::Result<()> {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(args.submit_secs);
        let mut tasks = Vec::new();
        for i in 0..args.submit_clients {
            let client = self.clients[i % self.clients.len()].clone();
            let (done, failed) = (done.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let body =
                        json!({"jobName": "load", "jobQueue": "parked", "jobDefinition": "sim"});
                    match client.call("SubmitJob", body).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        row(
            &format!(
                "SubmitJob through the API, SigV4-signed, {} clients over all {} nodes",
                args.submit_clients, args.control_nodes
            ),
            &format!(
                "{:.0} req/s ({} failed)",
                done.load(Ordering::Relaxed) as f64 / args.submit_secs as f64,
                failed.load(Ordering::Relaxed)
            ),
        );
        Ok(())
    }

    /// Resident memory per queued job on each control node: the process's growth while
    /// `queued_jobs` RUNNABLE jobs are added, divided by jobs and by the three replicas.
    async fn memory(&self, args: &BenchArgs) -> anyhow::Result<()> {
        let count = |s: &State| s.job_count_in_queue("parked") as u64;
        let start_jobs = self.leader_state(count).unwrap_or(0);
        let before = resident_kib();
        let mut left = args.queued_jobs;
        while left > 0 {
            let size = left.clamp(2, ARRAY_MAX);
            self.submit("parked", size).await?;
            left = left.saturating_sub(size);
        }
        // Wait until every replica holds them all (arrays add one parent each).
        let want = start_jobs + args.queued_jobs;
        let deadline = Instant::now() + Duration::from_secs(600);
        while self
            .cluster
            .running()
            .any(|n| count(&n.raft.state.read().state) < want)
        {
            anyhow::ensure!(Instant::now() < deadline, "replicas did not catch up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = resident_kib();
        let per_job = (after.saturating_sub(before)) as f64 * 1024.0
            / args.queued_jobs as f64
            / args.control_nodes as f64;
        row(
            &format!(
                "resident memory per queued job per control node ({} queued)",
                args.queued_jobs
            ),
            &format!(
                "{per_job:.0} B (process RSS {} → {} MiB)",
                before / 1024,
                after / 1024
            ),
        );
        Ok(())
    }

    /// Submits `count` jobs as arrays (at most 100,000 waiting at a time) and waits until
    /// every node has them ended, out of memory and stored, and has settled.
    async fn end_jobs(&self, count: u64) -> anyhow::Result<EndedRun> {
        let ended = |s: &State| s.ended_job_count() as u64;
        let start = self.leader_state(ended).unwrap_or(0);
        let started = Instant::now();
        let (mut submitted, mut arrays) = (0, Vec::new());
        while submitted < count {
            let waiting = self.leader_state(|s| s.job_count() as u64).unwrap_or(0);
            if waiting > 100_000 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let size = (count - submitted).clamp(2, ARRAY_MAX);
            arrays.push((self.submit("bench", size).await?, size));
            submitted += size;
        }
        // Each array's parent ends too.
        let want = start + submitted + arrays.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(4 * 3600);
        while self
            .cluster
            .running()
            .any(|n| ended(&n.raft.state.read().state) < want)
        {
            anyhow::ensure!(Instant::now() < deadline, "jobs did not all end");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let took = started.elapsed();
        // Out of memory on every node by now; stored once each node's writer has caught up.
        let archives: Vec<_> = self
            .cluster
            .running()
            .map(|n| n.raft.state.archive().clone())
            .collect();
        tokio::task::spawn_blocking(move || archives.iter().try_for_each(|a| a.flush())).await??;
        let stored = started.elapsed();
        self.settle().await?;
        Ok(EndedRun {
            submitted,
            ended: want - start,
            arrays,
            took,
            stored,
        })
    }

    /// Runs `--ended-jobs` jobs to their end, then measures what each costs in memory once
    /// archived, and DescribeJobs and ListJobs served from the archive.
    async fn ended(&self, args: &BenchArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
        // In two halves, each run to its end, stored on every node and settled before
        // resident memory is read: what the second half adds is what ended jobs cost, apart
        // from what the first half's peak (100,000 jobs waiting, jobs ended faster than the
        // archive's writer stores them, caches filling) left the allocator and sled holding.
        let before = resident_kib();
        let first = self.end_jobs(args.ended_jobs / 2).await?;
        let at_half = resident_kib();
        let second = self.end_jobs(args.ended_jobs - args.ended_jobs / 2).await?;
        let after = resident_kib();
        let (submitted, took, stored) = (
            first.submitted + second.submitted,
            first.took + second.took,
            first.stored + second.stored,
        );
        row(
            &format!("{submitted} jobs run to their end and archived / and stored on every node"),
            &format!(
                "{:.0} s ({:.0} jobs/s) / {:.0} s ({:.0} jobs/s)",
                took.as_secs_f64(),
                submitted as f64 / took.as_secs_f64(),
                stored.as_secs_f64(),
                submitted as f64 / stored.as_secs_f64()
            ),
        );
        let per_job = |from: u64, ended: u64| {
            after.saturating_sub(from) as f64 * 1024.0 / ended as f64 / args.control_nodes as f64
        };
        let in_memory = self.leader_state(|s| s.job_count()).unwrap_or(0);
        let ended = first.ended + second.ended;
        row(
            &format!(
                "resident memory per ended job per control node ({ended} ended, {in_memory} in memory)"
            ),
            &format!(
                "{:.0} B (process RSS {} → {} MiB)",
                per_job(before, ended),
                before / 1024,
                after / 1024
            ),
        );
        row(
            "resident memory per ended job per control node, second half only",
            &format!(
                "{:.0} B (process RSS {} → {} MiB)",
                per_job(at_half, second.ended),
                at_half / 1024,
                after / 1024
            ),
        );
        let arrays: Vec<(String, u64)> = first.arrays.into_iter().chain(second.arrays).collect();
        row(
            "data directories on disk (log, snapshots, archive), all control nodes",
            &format!("{} MiB", dir_bytes(data_dir) / (1024 * 1024)),
        );

        // The same call for a job in memory, under the same conditions: what the archive adds.
        let waiting = self.submit("parked", 1).await?;
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let began = Instant::now();
            self.call("DescribeJobs", json!({ "jobs": [&waiting] }))
                .await?;
            samples.push(began.elapsed());
        }
        row(
            "DescribeJobs of one job in memory, for comparison (2,000 calls)",
            &percentiles(&mut samples),
        );

        // One ended job per call, picked at random: array children mostly, some parents.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Apart: a parent's statusSummary counts its children.
        let (mut children, mut parents) = (Vec::new(), Vec::new());
        for i in 0..2000 {
            let (array, size) = &arrays[(next() % arrays.len() as u64) as usize];
            let id = if i % 10 == 0 {
                array.clone()
            } else {
                format!("{array}:{}", next() % size)
            };
            let began = Instant::now();
            let answer = self.call("DescribeJobs", json!({ "jobs": [&id] })).await?;
            if i % 10 == 0 {
                parents.push(began.elapsed());
            } else {
                children.push(began.elapsed());
            }
            anyhow::ensure!(
                answer["jobs"][0]["status"] == "SUCCEEDED",
                "{id} did not describe as SUCCEEDED: {answer}"
            );
        }
        row(
            "DescribeJobs of one ended array child (1,800 calls)",
            &percentiles(&mut children),
        );
        row(
            "DescribeJobs of one ended array parent, statusSummary counted (200 calls)",
            &percentiles(&mut parents),
        );
        let mut samples = Vec::new();
        for _ in 0..200 {
            let began = Instant::now();
            let page = self
                .call(
                    "ListJobs",
                    json!({"jobQueue": "bench", "jobStatus": "SUCCEEDED", "maxResults": 100}),
                )
                .await?;
            samples.push(began.elapsed());
            anyhow::ensure!(
                page["jobSummaryList"]
                    .as_array()
                    .is_some_and(|l| !l.is_empty())
            );
        }
        row(
            "ListJobs SUCCEEDED, first page of 100 (200 calls)",
            &percentiles(&mut samples),
        );
        Ok(())
    }

    /// How long the leader takes to write its whole state into a snapshot and save it, and
    /// the slowest of the submits answered meanwhile: a node writing a snapshot must go on
    /// committing and answering.
    async fn snapshot(&self) -> anyhow::Result<()> {
        let leader = self.cluster.leader().context("no leader")?;
        let raft = self.cluster.node(leader).context("no leader")?.raft.clone();
        let jobs = raft.state.read().state.job_count();
        let before = raft.raft.metrics().borrow().snapshot;
        let started = Instant::now();
        raft.raft.trigger().snapshot().await?;
        let written = std::sync::atomic::AtomicBool::new(false);
        let saved = async {
            let deadline = started + Duration::from_secs(600);
            while raft.raft.metrics().borrow().snapshot == before {
                anyhow::ensure!(Instant::now() < deadline, "no snapshot after 10 min");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written.store(true, Ordering::Relaxed);
            Ok(started.elapsed())
        };
        let probe = async {
            let (mut slowest, mut answered) = (Duration::ZERO, 0);
            while !written.load(Ordering::Relaxed) {
                let sent = Instant::now();
                self.submit("parked", 1).await?;
                slowest = slowest.max(sent.elapsed());
                answered += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>((slowest, answered))
        };
        let (saved, probed) = tokio::join!(saved, probe);
        let (saved, (slowest, answered)) = (saved?, probed?);
        row(
            &format!("leader writes and saves a snapshot of its state ({jobs} jobs)"),
            &format!(
                "{} ms (slowest of {answered} SubmitJobs answered meanwhile: {} ms)",
                saved.as_millis(),
                slowest.as_millis()
            ),
        );
        Ok(())
    }

    /// On the state as loaded: a snapshot file saved (`muster cluster snapshot save`), read
    /// back and checked, and restored into an empty store (`restore`); then a new control
    /// node started empty, added, caught up from the leader (a snapshot: the log holds less
    /// than the state) and made a voter (`muster cluster add-node`).
    async fn operations(
        &mut self,
        data_dir: &std::path::Path,
        args: &BenchArgs,
    ) -> anyhow::Result<()> {
        let leader = self.cluster.leader().context("no leader")?;
        let raft = self.cluster.node(leader).context("no leader")?.raft.clone();
        let state = raft.state.clone();
        let resident_before = resident_kib();
        let peak_measured = reset_peak_resident();
        let started = Instant::now();
        let path = data_dir.join("bench.snapshot");
        let header = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut saved = muster_raft::backup::save(&state, "bench", 0, state.spool())?;
                let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
                std::io::Write::write_all(&mut file, &saved.header_line)?;
                std::io::copy(&mut saved.body, &mut file)?;
                std::io::Write::flush(&mut file)?;
                anyhow::Ok(saved.header)
            })
            .await??
        };
        let saved = started.elapsed();
        let started = Instant::now();
        let backup = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || muster_raft::backup::read(&path)).await??
        };
        let read = started.elapsed();
        let store_dir = data_dir.join("restored");
        let started = Instant::now();
        let db = muster_store::open_sled_waiting(&store_dir.join("raft")).await?;
        let snapshots = muster_store::SledSnapshotStore::new(&db)?;
        let archive = muster_raft::EndedJobs::new(
            muster_store::ArchiveStore::open(&store_dir.join("archive")).await?,
        );
        let members = std::collections::BTreeMap::from([(1, muster_raft::Member::default())]);
        muster_raft::backup::restore(
            &snapshots,
            &archive,
            backup.applied,
            backup.archived,
            header.index,
            members,
        )
        .await?;
        db.flush().await?;
        let restored = started.elapsed();
        drop((db, archive));
        std::fs::remove_file(&path)?;
        let peak = peak_measured.then(peak_resident_kib);
        row(
            &format!(
                "snapshot file of {} jobs: save / read and check / restore",
                header.jobs
            ),
            &format!(
                "{} MiB; {} ms / {} ms / {} ms{}",
                header.image_bytes / (1024 * 1024),
                saved.as_millis(),
                read.as_millis(),
                restored.as_millis(),
                peak_row(resident_before, peak)
            ),
        );

        self.add_control_node(args).await
    }

    /// A new control node started empty, added, caught up from the leader (a snapshot: the
    /// log holds less than the state, archived jobs and all) and made a voter (`muster cluster
    /// add-node`); then removed again. With the peak of this process's resident memory
    /// meanwhile (the leader sending and the new node receiving the snapshot are both here).
    async fn add_control_node(&mut self, args: &BenchArgs) -> anyhow::Result<()> {
        let leader = self.cluster.leader().context("no leader")?;
        let raft = self.cluster.node(leader).context("no leader")?.raft.clone();
        // The leader's log purged behind a snapshot, as it is once a cluster has run a while:
        // the new node must be sent the whole state, not the few entries that made it.
        let before = raft.raft.metrics().borrow().snapshot;
        raft.raft.trigger().snapshot().await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while raft.raft.metrics().borrow().snapshot == before {
            anyhow::ensure!(Instant::now() < deadline, "no snapshot after 10 min");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snapshot_index = raft.raft.metrics().borrow().snapshot.map_or(0, |l| l.index);
        raft.raft.trigger().purge_log(snapshot_index).await?;
        while raft.raft.metrics().borrow().purged.map_or(0, |l| l.index) < snapshot_index {
            anyhow::ensure!(Instant::now() < deadline, "log not purged after 10 min");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let id = args.control_nodes + 1;
        let member = self.cluster.start_node_to_add(id).await?;
        let resident_before = resident_kib();
        let peak_measured = reset_peak_resident();
        let started = Instant::now();
        let outcome = raft
            .add_node(id, member, Duration::from_secs(1800))
            .await
            .map_err(|e| anyhow::anyhow!("add-node: {e}"))?;
        let joined = started.elapsed();
        let peak = peak_row(resident_before, peak_measured.then(peak_resident_kib));
        let (jobs, ended) = {
            let new_node = self.cluster.node(id).context("the new node")?;
            let state = new_node.raft.state.read();
            (state.state.job_count(), new_node.raft.state.archive().len())
        };
        row(
            &format!(
                "a new control node caught up (from a snapshot: log purged to {snapshot_index}) and voting ({jobs} jobs in memory, {ended} archived)"
            ),
            &format!("{} ms ({outcome:?}){peak}", joined.as_millis()),
        );
        // Back to the size the rest of the run measures.
        raft.remove_node(id)
            .await
            .map_err(|e| anyhow::anyhow!("remove-node: {e}"))?;
        self.cluster.stop_node(id).await;
        Ok(())
    }

    /// Time from stopping the leader to the next placement committed by its successor.
    /// The clock runs while the old leader shuts down (its servers drain for a while), as it
    /// would while a killed leader's sockets time out: the survivors do not wait for either.
    async fn failover(&mut self, fleet: usize) -> anyhow::Result<()> {
        let Some(leader) = self.cluster.leader() else {
            anyhow::bail!("no leader");
        };
        let tally = self.tally.clone();
        let placed_before = tally.placed.load(Ordering::Relaxed);
        let nodes = self.clients.len() as u64;
        let survivor = self.clients[(leader % nodes) as usize].clone();
        let survivor_raft = self
            .cluster
            .node(leader % nodes + 1)
            .context("no survivor")?
            .raft
            .clone();
        let stopped = Instant::now();
        let elected = {
            let survivor_raft = survivor_raft.clone();
            async move {
                loop {
                    if let (Some(l), _) = survivor_raft.leader()
                        && l != leader
                    {
                        return stopped.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let measure = async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let job = loop {
                let body = json!({"jobName": "after-failover", "jobQueue": "bench",
                                  "jobDefinition": "sim"});
                if let Ok(answer) = survivor.call("SubmitJob", body).await {
                    break muster_core::JobId::from(answer["jobId"].as_str().unwrap_or_default());
                }
                anyhow::ensure!(Instant::now() < deadline, "no survivor accepted a submit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let accepted = stopped.elapsed();
            // Committed: the survivor has applied the job's placement (and maybe its end).
            let waiting = |s: &State| {
                s.find_job(&job).is_none_or(|j| {
                    use muster_core::JobStatus::*;
                    matches!(j.status, Submitted | Pending | Runnable)
                })
            };
            while waiting(&survivor_raft.state.read().state) {
                anyhow::ensure!(Instant::now() < deadline, "nothing placed after failover");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let committed = stopped.elapsed();
            while tally.placed.load(Ordering::Relaxed) <= placed_before {
                anyhow::ensure!(Instant::now() < deadline, "no agent was handed it");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok((accepted, committed, stopped.elapsed()))
        };
        let fleet = fleet as u64;
        let opened_before = self.tally.streams_opened.load(Ordering::Relaxed);
        let tally = self.tally.clone();
        // When half and then all of the fleet had a stream at the new leader again.
        let returned = async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let back = || tally.streams_opened.load(Ordering::Relaxed) - opened_before;
            let mut half = None;
            while back() < fleet && Instant::now() < deadline {
                if half.is_none() && back() >= fleet / 2 {
                    half = Some(stopped.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (half, (back() >= fleet).then(|| stopped.elapsed()))
        };
        let (_, measured, elected, (half_back, all_back)) =
            tokio::join!(self.cluster.stop_node(leader), measure, elected, returned);
        let (accepted, committed, received) = measured?;
        let millis =
            |d: Option<Duration>| d.map_or("—".to_owned(), |d| d.as_millis().to_string());
        row(
            "leader stopped → next placement committed by the new leader",
            &format!(
                "{} ms (new leader after {} ms, a survivor accepted a submit after {} ms; \
                 its agent had it after {} ms; half the agents watching the new leader after \
                 {} ms, all after {} ms)",
                committed.as_millis(),
                elected.as_millis(),
                accepted.as_millis(),
                received.as_millis(),
                millis(half_back),
                millis(all_back),
            ),
        );
        Ok(())
    }
}

/// A fixed piece of single-threaded work of the kind the control plane does most (allocating,
/// comparing and freeing keyed strings), timed before the cluster is loaded. The same VM type
/// has run the same binary at very different speeds on different days; this figure, printed
/// with every run, tells a slower machine from slower code.
fn calibration_ms() -> u128 {
    let started = Instant::now();
    let mut keyed = std::collections::BTreeMap::new();
    for i in 0..1_000_000u64 {
        keyed.insert(
            format!("job-{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            i,
        );
    }
    std::hint::black_box(&keyed);
    drop(keyed);
    started.elapsed().as_millis()
}

/// p50, p99 and the slowest of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn row(what: &str, result: &str) {
    println!("| {what} | {result} |");
}

/// This process's resident set, in KiB.
fn resident_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// "; process RSS … MiB before, peak … MiB", where the peak was measured.
fn peak_row(before_kib: u64, peak_kib: Option<u64>) -> String {
    match peak_kib {
        Some(peak) => format!(
            "; process RSS {} MiB before, peak {} MiB",
            before_kib / 1024,
            peak / 1024
        ),
        None => String::new(),
    }
}

/// This process's peak resident set since it started or since [`reset_peak_resident`].
fn peak_resident_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// Makes the peak resident set the current one; false where the kernel does not allow it.
fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
