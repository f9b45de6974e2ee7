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

pub async fn run(
    data_dir: PathBuf,
    api_addr: SocketAddr,
    executor: Option<&str>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    limits: muster_api::Limits,
    scope: muster_core::ArnScope,
    allowances: muster_agent::Allowances,
) -> anyhow::Result<()> {
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
    // The agent speaks mutual TLS with a certificate of the cluster's CA, as a real one does.
    let tls = cluster.agent_tls(AGENT_ID)?;
    let agent_config = RawAgentConfig {
        allow_privileged: allowances.privileged,
        allowed_host_paths: allowances.host_paths,
        plaintext: tls.is_none(),
        tls,
        ..RawAgentConfig::new(
            AGENT_ID,
            DEFAULT,
            cluster.grpc_addrs(),
            executor,
            data_dir.join("agent"),
        )
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("--allow-host-path: {e}"))?;
    let agent = Agent::new(agent_config).await?;
    eprintln!(
        "muster dev: jobs run with the {} executor",
        agent.executor_kind()
    );
    let (stop_agent, agent_stopped) = tokio::sync::watch::channel(false);
    let agent_task = tokio::spawn(agent.run(agent_stopped));

    // Ready once the agent has joined: a first job can then run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let joined = node
            .read(|s| s.node(&NodeId(AGENT_ID.to_owned())).is_some())
            .await
            .unwrap_or(false);
        if joined {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the dev agent did not register"
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
    let _ = agent_task.await;
    cluster.shutdown().await;
    Ok(())
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
