//! `muster dev`: three control nodes and one agent in one process, with AWS Batch's
//! getting-started defaults (a compute environment and a job queue named `default`).

use anyhow::Context;
use muster_agent::{Agent, ExecutorKind, RawAgentConfig};
use muster_control::LocalCluster;
use muster_core::NodeId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_control::bootstrap::DEFAULT;
const AGENT_ID: &str = "dev-agent";

/// The agents `muster dev` starts.
pub struct DevAgents<'a> {
    /// `docker` or `process`; by default docker when the engine answers.
    pub executor: Option<&'a str>,
    pub allowances: muster_agent::Allowances,
    pub count: usize,
}

pub async fn run(
    data_dir: PathBuf,
    api_addr: SocketAddr,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    limits: muster_api::Limits,
    scope: muster_core::ArnScope,
    agents: DevAgents<'_>,
) -> anyhow::Result<()> {
    let DevAgents {
        executor,
        allowances,
        count: agent_count,
    } = agents;
    let shutdown = crate::ShutdownSignal::install()?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let cluster = LocalCluster::start_tuned(
        &data_dir,
        3,
        api_addr,
        Some(metrics),
        muster_control::Tuning {
            limits,
            scope,
            ..Default::default()
        },
    )
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15)).await?;
    let node = &cluster.node(leader).context("leader is running")?.raft;
    // The root user's key, written as DIR/aws/credentials and DIR/aws/config.
    cluster.ensure_root(&data_dir.join("aws")).await?;
    muster_control::bootstrap::ensure_defaults(node).await?;

    let executor = choose_executor(executor).await?;
    let mut agents = Vec::new();
    for index in 1..=agent_count {
        let config = dev_agent(
            &cluster,
            &data_dir,
            index,
            agent_count,
            executor,
            &allowances,
        )?;
        agents.push((config.node_id.clone(), Agent::new(config).await?));
    }
    eprintln!(
        "muster dev: {} agent{}, jobs run with the {} executor",
        agents.len(),
        if agents.len() == 1 { "" } else { "s" },
        agents[0].1.executor_kind()
    );
    let (stop_agent, agent_stopped) = tokio::sync::watch::channel(false);
    let names: Vec<NodeId> = agents
        .iter()
        .map(|(name, _)| NodeId(name.clone()))
        .collect();
    let agent_tasks: Vec<_> = agents
        .into_iter()
        .map(|(_, agent)| tokio::spawn(agent.run(agent_stopped.clone())))
        .collect();

    // Ready once every agent has joined: a first job (and a multi-node one) can then run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let wanted = names.clone();
        let joined = node
            .read(move |s| wanted.iter().all(|n| s.node(n).is_some()))
            .await
            .unwrap_or(false);
        if joined {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the dev agents did not register"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scope = node
        .read(|s| s.arn_scope().clone())
        .await
        .context("reading the cluster's region")?;
    println!(
        "muster dev ready: AWS Batch API at http://{} (region {}, account {}); \
         internal ports on mutual TLS (CA in {})",
        cluster.api_addr(1),
        scope.region,
        scope.account,
        data_dir.join("tls").join("ca.pem").display()
    );

    shutdown.received().await;
    eprintln!("muster dev: shutting down");
    let _ = stop_agent.send(true);
    for task in agent_tasks {
        let _ = task.await;
    }
    cluster.shutdown().await;
    Ok(())
}

/// Agent `index` of `count`. One agent is `dev-agent` offering the whole machine; several
/// are `dev-agent-1`… that share it (each offering at least 1 vCPU and 1 GiB), each at a
/// loopback address of its own (127.0.0.2, 127.0.0.3, …) that multi-node jobs see as its
/// private address, in racks `rack-1` and `rack-2` alternately, so that a multi-node job and
/// its rendezvous run on one machine.
fn dev_agent(
    cluster: &LocalCluster,
    data_dir: &std::path::Path,
    index: usize,
    count: usize,
    executor: ExecutorKind,
    allowances: &muster_agent::Allowances,
) -> anyhow::Result<muster_agent::AgentConfig> {
    let (name, work_dir) = if count == 1 {
        (AGENT_ID.to_owned(), data_dir.join("agent"))
    } else {
        (
            format!("{AGENT_ID}-{index}"),
            data_dir.join(format!("agent-{index}")),
        )
    };
    // The agent speaks mutual TLS with a certificate of the cluster's CA, as a real one does.
    let tls = cluster.agent_tls(&name)?;
    let mut raw = RawAgentConfig {
        allow_privileged: allowances.privileged,
        allowed_host_paths: allowances.host_paths.clone(),
        plaintext: tls.is_none(),
        tls,
        ..RawAgentConfig::new(&name, DEFAULT, cluster.grpc_addrs(), executor, work_dir)
    };
    if count > 1 {
        raw.private_address = Some(std::net::IpAddr::from([127, 0, 0, 1 + index as u8]));
        raw.topology = vec![format!("rack=rack-{}", (index - 1) % 2 + 1)];
    }
    let mut config = raw
        .validate()
        .map_err(|e| anyhow::anyhow!("--allow-host-path: {e}"))?;
    if count > 1 {
        // Shares of the machine, but never less than a job's smallest useful size: on a
        // two-core laptop four agents each offer one vCPU.
        let share = |total: u64, floor: u64| (total / count as u64).max(floor);
        config.vcpus_override = Some(share(muster_agent::inventory::machine_millicpus(), 1000));
        config.memory_override_mib =
            Some(share(muster_agent::inventory::machine_memory_mib(), 1024));
    }
    Ok(config)
}

async fn choose_executor(requested: Option<&str>) -> anyhow::Result<ExecutorKind> {
    match requested {
        Some("docker") => Ok(ExecutorKind::Docker),
        Some("process") => Ok(ExecutorKind::Process),
        Some(other) => anyhow::bail!("--executor {other}: must be docker or process"),
        None => Ok(
            match muster_agent::executor::DockerExecutor::connect(DEFAULT).await {
                Ok(_) => ExecutorKind::Docker,
                Err(e) => {
                    eprintln!(
                        "muster dev: no Docker engine answered ({e}); using the process executor"
                    );
                    ExecutorKind::Process
                }
            },
        ),
    }
}
