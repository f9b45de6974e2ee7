//! `muster`: the one binary. `server` runs a control node, `agent` a worker, `dev` a whole
//! local cluster with an agent in one process, `cluster` founds a cluster's files and manages
//! who may join, `bench` a cluster with simulated agents under load.

mod bench;
mod cluster;
mod dev;
mod job_logs;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// glibc's allocator was a sixth of the CPU under load (its free lists, consolidation, and
/// the pages it hands back to the kernel only to fault them in again, zeroed, for sled's next
/// large buffer); mimalloc's per-thread heaps keep both cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "muster", version, about = "AWS Batch that you run yourself")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run one control node.
    Server {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a new cluster's certificates and configs; see and change its control nodes;
    /// manage who may join it.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Drain and undrain worker agents; list them.
    Node {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long, global = true)]
        endpoint_url: Option<String>,
        #[command(subcommand)]
        command: cluster::AgentCommand,
    },
    /// Run one worker agent.
    Agent {
        #[arg(long, required_unless_present = "print_inventory")]
        config: Option<PathBuf>,
        /// Print what this machine would offer (CPUs, memory, GPUs) as JSON, and exit.
        #[arg(long)]
        print_inventory: bool,
        /// `docker` or `process`, over the config's `executor`.
        #[arg(long)]
        executor: Option<String>,
        /// A join token, over the config's `join_token` (or set `MUSTER_JOIN_TOKEN`, which other
        /// users of the machine cannot read, unlike a command line).
        #[arg(long)]
        join: Option<String>,
    },
    /// Watch over an agent's attempts (started by `muster agent`; see `muster_agent::warden`).
    #[command(name = "agent-warden", hide = true)]
    AgentWarden {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        agent_pid: u32,
        /// The agent's executor, where it differs from the config's.
        #[arg(long)]
        executor: Option<String>,
    },
    /// Manage users, access keys and policies (like `aws iam`).
    Iam {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long, global = true)]
        endpoint_url: Option<String>,
        #[command(subcommand)]
        command: IamCommand,
    },
    /// Run three control nodes and an agent in this process: a complete local cluster.
    Dev {
        #[arg(long, default_value = "./muster-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7070")]
        api_addr: SocketAddr,
        /// `docker` or `process`; by default docker when the engine answers.
        #[arg(long)]
        executor: Option<String>,
        /// The region every ARN names and requests are signed for (set when the data
        /// directory's cluster is founded; a later start keeps the first).
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// The twelve-digit account every ARN names (as --region).
        #[arg(long, default_value = "000000000000")]
        account_id: String,
        /// A host path jobs may mount (and what is below it); repeatable. None by default.
        #[arg(long = "allow-host-path", value_name = "PATH")]
        allow_host_paths: Vec<String>,
        /// Let jobs run privileged containers, with devices or added capabilities (their
        /// definitions also need the `batch:RegisterPrivilegedJobDefinition` allowance).
        #[arg(long)]
        allow_privileged: bool,
        /// How many agents to start. Several share the machine (each offering at least 1 vCPU
        /// and 1 GiB), each at a loopback address of its own and in two racks, so that
        /// multi-node jobs run on one machine.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=200))]
        agents: u8,
        /// For tests only: lower AWS's 60-second minimum `attemptDurationSeconds`.
        #[arg(long, hide = true, default_value_t = 60)]
        test_min_attempt_duration_secs: u64,
        /// For tests only: lower AWS's 600-second minimum for `jobStateTimeLimitActions`.
        #[arg(long, hide = true, default_value_t = 600)]
        test_min_state_time_limit_secs: u64,
    },
    /// Work with jobs beyond what `aws batch` offers.
    Job {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long, global = true)]
        endpoint_url: Option<String>,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Measure a three-node cluster under load from simulated agents (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Call any AWS Batch operation, signed with SigV4 as the aws CLI signs it (endpoint and
    /// credentials found the same way); prints the JSON answer. For scripts on machines
    /// without the aws CLI: `muster api SubmitJob '{"jobName": …}'`.
    Api {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long)]
        endpoint_url: Option<String>,
        /// The operation, as AWS names it (`SubmitJob`, `DescribeJobs`, …).
        operation: String,
        /// The request body as JSON (default `{}`).
        body: Option<String>,
    },
    /// Look into a stopped control node's data.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Replay the node's committed log through a fresh state, checking after every entry
    /// that no node is over-committed and every node's books match its jobs; prints JSON and
    /// exits non-zero on a violation.
    ReplayLog {
        /// The node's `data_dir` (the node must be stopped).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Print a job's output (stdout and stderr), kept by the agent that ran it.
    Logs {
        job_id: String,
        /// Which attempt (1-based); the latest by default.
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing new output until the job ends.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum IamCommand {
    CreateUser {
        #[arg(long)]
        user_name: String,
    },
    DeleteUser {
        #[arg(long)]
        user_name: String,
    },
    ListUsers,
    /// Prints the new key's secret: the only time it is shown.
    CreateAccessKey {
        #[arg(long)]
        user_name: String,
    },
    ListAccessKeys {
        #[arg(long)]
        user_name: String,
    },
    DeleteAccessKey {
        #[arg(long)]
        user_name: String,
        #[arg(long)]
        access_key_id: String,
    },
    /// The document is JSON, or `file://PATH`.
    PutUserPolicy {
        #[arg(long)]
        user_name: String,
        #[arg(long)]
        policy_name: String,
        #[arg(long)]
        policy_document: String,
    },
    GetUserPolicy {
        #[arg(long)]
        user_name: String,
        #[arg(long)]
        policy_name: String,
    },
    ListUserPolicies {
        #[arg(long)]
        user_name: String,
    },
    DeleteUserPolicy {
        #[arg(long)]
        user_name: String,
        #[arg(long)]
        policy_name: String,
    },
}

impl IamCommand {
    /// The operation's name and request body, with IAM's member names.
    fn request(self) -> anyhow::Result<(&'static str, serde_json::Value)> {
        use serde_json::json;
        Ok(match self {
            IamCommand::CreateUser { user_name } => {
                ("CreateUser", json!({ "UserName": user_name }))
            }
            IamCommand::DeleteUser { user_name } => {
                ("DeleteUser", json!({ "UserName": user_name }))
            }
            IamCommand::ListUsers => ("ListUsers", json!({})),
            IamCommand::CreateAccessKey { user_name } => {
                ("CreateAccessKey", json!({ "UserName": user_name }))
            }
            IamCommand::ListAccessKeys { user_name } => {
                ("ListAccessKeys", json!({ "UserName": user_name }))
            }
            IamCommand::DeleteAccessKey {
                user_name,
                access_key_id,
            } => (
                "DeleteAccessKey",
                json!({ "UserName": user_name, "AccessKeyId": access_key_id }),
            ),
            IamCommand::PutUserPolicy {
                user_name,
                policy_name,
                policy_document,
            } => {
                let document = match policy_document.strip_prefix("file://") {
                    Some(path) => {
                        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
                    }
                    None => policy_document,
                };
                (
                    "PutUserPolicy",
                    json!({ "UserName": user_name, "PolicyName": policy_name, "PolicyDocument": document }),
                )
            }
            IamCommand::GetUserPolicy {
                user_name,
                policy_name,
            } => (
                "GetUserPolicy",
                json!({ "UserName": user_name, "PolicyName": policy_name }),
            ),
            IamCommand::ListUserPolicies { user_name } => {
                ("ListUserPolicies", json!({ "UserName": user_name }))
            }
            IamCommand::DeleteUserPolicy {
                user_name,
                policy_name,
            } => (
                "DeleteUserPolicy",
                json!({ "UserName": user_name, "PolicyName": policy_name }),
            ),
        })
    }
}

/// Runs one IAM call and prints its JSON answer; errors read and exit like the aws CLI's.
async fn iam(endpoint_url: Option<String>, command: IamCommand) -> anyhow::Result<()> {
    let (operation, body) = command.request()?;
    let client = muster_client::BatchClient::from_environment(endpoint_url)?;
    print_answer(operation, client.call_iam(operation, body).await, false)
}

/// Prints a call's JSON answer (an empty object only when `empty_too`); an API error reads
/// and exits as the aws CLI's does.
fn print_answer(
    operation: &str,
    answer: Result<serde_json::Value, muster_client::CallError>,
    empty_too: bool,
) -> anyhow::Result<()> {
    match answer {
        Ok(answer) => {
            if empty_too || answer.as_object().is_some_and(|o| !o.is_empty()) {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            }
            Ok(())
        }
        Err(muster_client::CallError::Api { code, message, .. }) => {
            eprintln!(
                "An error occurred ({code}) when calling the {operation} operation: {message}"
            );
            std::process::exit(255);
        }
        Err(e) => Err(e.into()),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,muster=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let armed = muster_crashpoint::check_env().map_err(anyhow::Error::msg)?;
    if !armed.is_empty() {
        tracing::warn!(?armed, "crash points armed ({})", muster_crashpoint::ENV);
    }
    match cli.command {
        Commands::Server { config } => server(config).await,
        Commands::Cluster { command } => cluster::run(command).await,
        Commands::Node {
            endpoint_url,
            command,
        } => cluster::agents(endpoint_url, command).await,
        Commands::Agent {
            config,
            print_inventory: true,
            ..
        } => print_inventory(config),
        Commands::Agent {
            config: Some(config),
            executor,
            join,
            ..
        } => agent(config, executor, join).await,
        Commands::Agent { config: None, .. } => anyhow::bail!("--config is required"),
        Commands::AgentWarden {
            config,
            agent_pid,
            executor,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let mut raw = muster_agent::RawAgentConfig::from_toml(&text)?;
            if let Some(executor) = executor {
                raw.executor = parse_executor(&executor)?;
            }
            let config = raw.validate()?;
            muster_agent::warden::watch_over(config, agent_pid).await?;
            Ok(())
        }
        Commands::Iam {
            endpoint_url,
            command,
        } => iam(endpoint_url, command).await,
        Commands::Dev {
            data_dir,
            api_addr,
            executor,
            region,
            account_id,
            allow_host_paths,
            allow_privileged,
            agents,
            test_min_attempt_duration_secs,
            test_min_state_time_limit_secs,
        } => {
            let scope = muster_core::ArnScope {
                region,
                account: account_id,
            };
            if let Err(muster_core::ConfigError::Invalid { field, message }) = scope.check() {
                anyhow::bail!("--{}: {message}", field.replace('_', "-"));
            }
            let limits = muster_api::Limits {
                min_attempt_duration_secs: test_min_attempt_duration_secs,
                min_state_time_limit_secs: test_min_state_time_limit_secs,
                ..Default::default()
            };
            dev::run(
                data_dir,
                api_addr,
                install_metrics()?,
                limits,
                scope,
                dev::DevAgents {
                    executor: executor.as_deref(),
                    allowances: muster_agent::Allowances {
                        privileged: allow_privileged,
                        host_paths: allow_host_paths,
                    },
                    count: usize::from(agents),
                },
            )
            .await
        }
        Commands::Bench(args) => bench::run(args).await,
        Commands::Api {
            endpoint_url,
            operation,
            body,
        } => {
            let body: serde_json::Value = serde_json::from_str(body.as_deref().unwrap_or("{}"))
                .context("the request body is not JSON")?;
            let client = muster_client::BatchClient::from_environment(endpoint_url)?;
            print_answer(&operation, client.call(&operation, body).await, true)
        }
        Commands::Debug {
            command: DebugCommand::ReplayLog { data_dir },
        } => {
            let replay = muster_control::replay::replay_log(&data_dir)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("replaying the log in {}", data_dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&replay)?);
            if !replay.violations.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Commands::Job {
            endpoint_url,
            command:
                JobCommand::Logs {
                    job_id,
                    attempt,
                    follow,
                },
        } => {
            let client = muster_client::BatchClient::from_environment(endpoint_url)?;
            job_logs::print(&client, &job_id, attempt, follow).await
        }
    }
}

async fn server(path: PathBuf) -> anyhow::Result<()> {
    let shutdown = ShutdownSignal::install()?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = muster_control::RawServerConfig::from_toml(&text)?.validate()?;
    let listeners = muster_control::Listeners {
        grpc: tokio::net::TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding {}", config.grpc_addr))?,
        raft: tokio::net::TcpListener::bind(config.raft_addr)
            .await
            .with_context(|| format!("binding {}", config.raft_addr))?,
        api: tokio::net::TcpListener::bind(config.api_addr)
            .await
            .with_context(|| format!("binding {}", config.api_addr))?,
    };
    let node =
        muster_control::ControlNode::start(config, listeners, Some(install_metrics()?)).await?;
    tokio::select! {
        () = shutdown.received() => {
            node.shutdown().await;
            Ok(())
        }
        why = node.raft_failed() => {
            tracing::error!(%why, "Raft stopped on its own (a storage failure?): exiting, to be restarted from the data directory");
            // After a write failed on a full disk, sled can wait for good on the flush that
            // dropping one of its trees does (the chaos harness's `disk_full` found nodes that
            // never exited, and so were never restarted). What stops within the bound stops;
            // the process exits all the same, as a crash would, which the stores survive.
            if tokio::time::timeout(STOP_AFTER_RAFT_FAILED, node.shutdown()).await.is_err() {
                tracing::error!(
                    secs = STOP_AFTER_RAFT_FAILED.as_secs(),
                    "the node did not stop in time: exiting without it"
                );
            }
            eprintln!("Error: Raft stopped: {why}");
            std::process::exit(1)
        }
    }
}

/// How long `muster server` waits for its node to stop after Raft stopped on its own.
const STOP_AFTER_RAFT_FAILED: std::time::Duration = std::time::Duration::from_secs(10);

fn parse_executor(name: &str) -> anyhow::Result<muster_agent::ExecutorKind> {
    match name {
        "docker" => Ok(muster_agent::ExecutorKind::Docker),
        "process" => Ok(muster_agent::ExecutorKind::Process),
        other => anyhow::bail!("--executor {other}: must be docker or process"),
    }
}

async fn agent(
    path: PathBuf,
    executor: Option<String>,
    join: Option<String>,
) -> anyhow::Result<()> {
    let shutdown = ShutdownSignal::install()?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut raw = muster_agent::RawAgentConfig::from_toml(&text)?;
    if let Some(executor) = executor {
        raw.executor = parse_executor(&executor)?;
    }
    // A token on the command line is readable by every local user (`/proc/*/cmdline`);
    // `MUSTER_JOIN_TOKEN` is not.
    if let Some(token) = join.or_else(|| std::env::var("MUSTER_JOIN_TOKEN").ok()) {
        raw.join_token = Some(token);
    }
    let config = raw.validate()?;
    // Attempts must not outlive the agent's lease should the agent die: the warden, a process
    // of its own, stops them then.
    let program = std::env::current_exe().context("finding the muster binary")?;
    muster_agent::warden::ensure_warden(&program, &path, &config.work_dir, config.executor)
        .with_context(|| format!("starting the warden in {}", config.work_dir.display()))?;
    let agent = muster_agent::Agent::new(config).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(agent.run(stopped));
    shutdown.received().await;
    let _ = stop.send(true);
    running.await?;
    Ok(())
}

fn print_inventory(path: Option<PathBuf>) -> anyhow::Result<()> {
    let raw = match path {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            muster_agent::RawAgentConfig::from_toml(&text)?
        }
        None => muster_agent::RawAgentConfig::from_toml(
            "compute_environment = \"none\"\ncontrol_plane = [\"none\"]\nexecutor = \"process\"\nwork_dir = \".\"\n",
        )?,
    };
    let config = raw.validate()?;
    let started = std::time::Instant::now();
    let gpus = muster_agent::inventory::gpus();
    eprintln!("GPU discovery took {} ms", started.elapsed().as_millis());
    let address = config.private_address.to_string();
    let inventory = muster_agent::inventory::collect(&config, address, gpus);
    println!("{}", serde_json::to_string_pretty(&inventory)?);
    Ok(())
}

/// Ctrl-C or SIGTERM, listened for from the moment it is made: a signal that arrives while a
/// node is still opening its storage or joining is kept, and the node shuts down cleanly as soon
/// as it has started instead of dying half-started to the default disposition.
pub(crate) struct ShutdownSignal {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    pub(crate) fn install() -> anyhow::Result<ShutdownSignal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignal {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    pub(crate) async fn received(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
