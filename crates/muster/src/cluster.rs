//! `muster cluster`: founding a cluster's files (`init`, and `new-node` for a node to add
//! later), its control nodes (`status`, `add-node`, `remove-node`, `transfer-leader`), and
//! who may join it (`token`, `node revoke`, `node reinstate`); `muster node`: draining agents.

use anyhow::{Context, bail};
use clap::Subcommand;
use muster_tls::Role;
use muster_tls::pki::{ClusterCa, Validity, write_identity, write_pem};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Make a new cluster's CA, each control node's certificate and config, an agent config
    /// with a join token, and the root user's AWS credentials, in DIR (new or empty).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// `3` (or `5`): that many nodes on this host, on free loopback ports; or the
        /// comma-separated host names or addresses of the control nodes, one per node.
        #[arg(long)]
        servers: String,
        #[command(flatten)]
        options: InitOptions,
    },
    /// Join tokens: agents present one to have their certificate signed.
    Token {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long, global = true)]
        endpoint_url: Option<String>,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Every control node's view of Raft, and the agents by state; exits 2 when no leader
    /// holds a quorum.
    Status {
        #[arg(long)]
        endpoint_url: Option<String>,
        /// `table` or `json` (an object with `leader`, `term`, `quorum`, `cluster_level`, `members`, `agents`).
        #[arg(long, default_value = "table")]
        output: String,
    },
    /// Add a control node, started with `join_existing_cluster = true`: it joins as a learner,
    /// catches up, and then votes.
    AddNode {
        #[arg(long)]
        endpoint_url: Option<String>,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        grpc_addr: String,
        #[arg(long)]
        api_addr: String,
        /// How long it may take to catch up before it is made a voter.
        #[arg(long, default_value_t = 300)]
        catch_up_secs: u64,
    },
    /// Remove a control node (the leader hands leadership over first). Stop its process
    /// afterwards; its data directory is of no further use.
    RemoveNode {
        #[arg(long)]
        endpoint_url: Option<String>,
        id: u64,
    },
    /// Hand leadership to another voter (`--to`), or to the one furthest along.
    TransferLeader {
        #[arg(long)]
        endpoint_url: Option<String>,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Save the whole state to a file, or found a new cluster from one.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Write a certificate and config for a new control node (to add with `add-node`) into the
    /// directory `init` wrote, which holds the CA's key.
    NewNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// Its host name or address (default: this host, on free loopback ports).
        #[arg(long)]
        host: Option<String>,
    },
    /// Agents that joined.
    Node {
        /// The cluster's API; default: AWS_ENDPOINT_URL_BATCH.
        #[arg(long, global = true)]
        endpoint_url: Option<String>,
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Prints a new token: the only time its secret is shown.
    Create {
        /// Hours until it expires.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every token (never their secrets), every revoked agent and every reinstated one.
    List,
    /// No agent joins with the token from now on.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Cut the agent off: every call its certificate makes is refused, and it does not join
    /// again under that name until reinstated; its running jobs are retried elsewhere once it
    /// is lost.
    Revoke { name: String },
    /// Let a revoked agent's name join again, with a join token and a new key (delete the
    /// agent's `work_dir/tls` first): the certificates it held before the revocation stay
    /// refused. Allowed from ten minutes after the revocation.
    Reinstate { name: String },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Every job, queue, definition, user and key as of now (holding every write acknowledged
    /// before), from the cluster's API into FILE.
    Save {
        #[arg(long)]
        endpoint_url: Option<String>,
        file: PathBuf,
    },
    /// Found a new cluster from FILE: run on the founding node (the lowest id of its config's
    /// peers) before its first start, into its empty data directory; the other nodes start
    /// empty and receive the state from it.
    Restore {
        file: PathBuf,
        /// The founding node's config (`muster cluster init` writes it).
        #[arg(long)]
        config: PathBuf,
        /// Its data directory, where it differs from the config's `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// `muster node`: the agents.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Every agent with its state, whether it is drained, and its running attempts.
    List,
    /// Place nothing new on the agent; with `--wait`, return once its attempts have ended.
    Drain {
        name: String,
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, in seconds.
        #[arg(long, default_value_t = 3600)]
        wait_timeout_secs: u64,
    },
    /// Place attempts on the agent again.
    Undrain { name: String },
}

pub async fn agents(endpoint_url: Option<String>, command: AgentCommand) -> anyhow::Result<()> {
    let client = muster_client::BatchClient::from_environment(endpoint_url)?;
    match command {
        AgentCommand::List => {
            let answer = client
                .call_cluster("ListAgents", serde_json::json!({}))
                .await;
            crate::print_answer("ListAgents", answer, true)
        }
        AgentCommand::Undrain { name } => {
            let answer = client
                .call_cluster("UndrainAgent", serde_json::json!({ "node": name }))
                .await;
            crate::print_answer("UndrainAgent", answer, true)
        }
        AgentCommand::Drain {
            name,
            wait,
            wait_timeout_secs,
        } => {
            let answer = client
                .call_cluster("DrainAgent", serde_json::json!({ "node": name }))
                .await;
            if !wait || answer.is_err() {
                return crate::print_answer("DrainAgent", answer, true);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(wait_timeout_secs);
            loop {
                let listed = client
                    .call_cluster("ListAgents", serde_json::json!({}))
                    .await;
                let listed = match listed {
                    Ok(listed) => listed,
                    Err(e) => return crate::print_answer("ListAgents", Err(e), true),
                };
                let agent = listed["agents"]
                    .as_array()
                    .and_then(|all| all.iter().find(|a| a["node"] == name.as_str()))
                    .cloned()
                    .unwrap_or_default();
                if agent["runningAttempts"].as_u64() == Some(0) {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({ "agent": agent }))?
                    );
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "agent {name} still runs {} attempts after {wait_timeout_secs} s; it stays drained",
                        agent["runningAttempts"]
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// `muster cluster status` as a table.
fn status_table(status: &serde_json::Value) -> String {
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) if s.is_empty() => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![
        [
            "ID",
            "ROLE",
            "VOTER",
            "TERM",
            "LAST LOG",
            "APPLIED",
            "LAG",
            "CONTACT MS",
            "SNAPSHOT",
            "RAFT",
            "API",
            "LEVEL",
        ]
        .map(str::to_owned),
    ];
    for m in status["members"].as_array().into_iter().flatten() {
        rows.push(
            [
                "id",
                "role",
                "voter",
                "term",
                "last_log_index",
                "applied_index",
                "replication_lag",
                "last_contact_ms",
                "snapshot_index",
                "raft_addr",
                "api_addr",
                "command_level",
            ]
            .map(|k| cell(&m[k])),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "\nleader: {}   term: {}   quorum: {}   cluster level: {}\nagents: {}\n",
        cell(&status["leader"]),
        cell(&status["term"]),
        cell(&status["quorum"]),
        cell(&status["cluster_level"]),
        match status["agents"].as_object() {
            Some(by_state) if !by_state.is_empty() => by_state
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "none".to_owned(),
        }
    ));
    out
}

/// Ports of a multi-host cluster (every node the same): the API, agents, Raft.
const API_PORT: u16 = 7070;
const GRPC_PORT: u16 = 7101;
const RAFT_PORT: u16 = 7102;

/// Control nodes' certificates, renewed by running `init` again for now (a year).
const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

struct NodePlan {
    id: u64,
    host: String,
    api: u16,
    grpc: u16,
    raft: u16,
}

impl NodePlan {
    fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.host)
    }
}

pub async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    let client = |endpoint_url| muster_client::BatchClient::from_environment(endpoint_url);
    match command {
        ClusterCommand::Status {
            endpoint_url,
            output,
        } => {
            if !matches!(output.as_str(), "table" | "json") {
                bail!("--output {output}: must be table or json");
            }
            let answer = client(endpoint_url)?
                .call_cluster("Status", serde_json::json!({}))
                .await;
            let status = match answer {
                Ok(status) => status,
                Err(e) => return crate::print_answer("Status", Err(e), false),
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_table(&status));
            }
            if status["quorum"] != serde_json::Value::Bool(true) {
                eprintln!("no leader holds a quorum: the cluster cannot commit writes");
                std::process::exit(2);
            }
            Ok(())
        }
        ClusterCommand::AddNode {
            endpoint_url,
            id,
            raft_addr,
            grpc_addr,
            api_addr,
            catch_up_secs,
        } => {
            let body = serde_json::json!({
                "nodeId": id, "raftAddr": raft_addr, "grpcAddr": grpc_addr,
                "apiAddr": api_addr, "catchUpSeconds": catch_up_secs,
            });
            let answer = client(endpoint_url)?.call_cluster("AddNode", body).await;
            crate::print_answer("AddNode", answer, true)
        }
        ClusterCommand::RemoveNode { endpoint_url, id } => {
            let answer = client(endpoint_url)?
                .call_cluster("RemoveNode", serde_json::json!({ "nodeId": id }))
                .await;
            crate::print_answer("RemoveNode", answer, true)
        }
        ClusterCommand::TransferLeader { endpoint_url, to } => {
            let answer = client(endpoint_url)?
                .call_cluster("TransferLeader", serde_json::json!({ "to": to }))
                .await;
            crate::print_answer("TransferLeader", answer, true)
        }
        ClusterCommand::NewNode { dir, id, host } => new_node(&dir, id, host),
        ClusterCommand::Snapshot {
            command: SnapshotCommand::Save { endpoint_url, file },
        } => {
            // Whole or not at all: written aside as it arrives, checked, then renamed over
            // FILE.
            let staged = file.with_extension("partial");
            let mut out = tokio::fs::File::create(&staged)
                .await
                .with_context(|| format!("writing {}", staged.display()))?;
            let answer = client(endpoint_url)?
                .call_cluster_to_file("SaveSnapshot", serde_json::json!({}), &mut out)
                .await;
            let synced = out.sync_all().await;
            drop(out);
            if let Err(e) = synced {
                let _ = std::fs::remove_file(&staged);
                return Err(e).with_context(|| format!("writing {}", staged.display()));
            }
            if let Err(e) = answer {
                let _ = std::fs::remove_file(&staged);
                return crate::print_answer("SaveSnapshot", Err(e), false);
            }
            let checked = {
                let staged = staged.clone();
                tokio::task::spawn_blocking(move || muster_raft::backup::read(&staged)).await?
            };
            let header = match checked {
                Ok(backup) => backup.header,
                Err(e) => {
                    let _ = std::fs::remove_file(&staged);
                    anyhow::bail!("the cluster sent a snapshot that does not check: {e}");
                }
            };
            std::fs::rename(&staged, &file)
                .with_context(|| format!("writing {}", file.display()))?;
            println!("{}", serde_json::to_string_pretty(&header)?);
            Ok(())
        }
        ClusterCommand::Snapshot {
            command:
                SnapshotCommand::Restore {
                    file,
                    config,
                    data_dir,
                },
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let mut config = muster_control::RawServerConfig::from_toml(&text)
                .and_then(|c| c.validate())
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            let header = muster_control::restore::restore_snapshot(&config, &file)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "Restored {} jobs (index {} of cluster {}) into {}; start the node, then the others with empty data directories.",
                header.jobs,
                header.index,
                header.cluster_name,
                config.data_dir.display()
            );
            Ok(())
        }
        ClusterCommand::Init {
            dir,
            servers,
            options,
        } => init(&dir, &servers, &options),
        ClusterCommand::Token {
            endpoint_url,
            command,
        } => {
            let (operation, body) = match command {
                TokenCommand::Create {
                    ttl_hours,
                    description,
                } => (
                    "CreateJoinToken",
                    serde_json::json!({"ttlSeconds": ttl_hours.saturating_mul(3600), "description": description}),
                ),
                TokenCommand::List => ("ListJoinTokens", serde_json::json!({})),
                TokenCommand::Revoke { id } => ("RevokeJoinToken", serde_json::json!({"id": id})),
            };
            let client = muster_client::BatchClient::from_environment(endpoint_url)?;
            crate::print_answer(operation, client.call_cluster(operation, body).await, false)
        }
        ClusterCommand::Node {
            endpoint_url,
            command,
        } => {
            let (operation, name) = match command {
                NodeCommand::Revoke { name } => ("RevokeAgent", name),
                NodeCommand::Reinstate { name } => ("ReinstateAgent", name),
            };
            let client = muster_client::BatchClient::from_environment(endpoint_url)?;
            let answer = client
                .call_cluster(operation, serde_json::json!({"node": name}))
                .await;
            crate::print_answer(operation, answer, false)
        }
    }
}

fn plan(servers: &str) -> anyhow::Result<Vec<NodePlan>> {
    if let Ok(count) = servers.parse::<u64>() {
        if !(1..=9).contains(&count) {
            bail!("--servers {count}: a cluster has 1 to 9 control nodes (3 or 5 is usual)");
        }
        // Free loopback ports, found by binding them; released before the nodes start.
        let mut held = Vec::new();
        let mut free_port = || -> anyhow::Result<u16> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            held.push(listener);
            Ok(port)
        };
        return (1..=count)
            .map(|id| {
                Ok(NodePlan {
                    id,
                    host: "127.0.0.1".into(),
                    api: free_port()?,
                    grpc: free_port()?,
                    raft: free_port()?,
                })
            })
            .collect();
    }
    let hosts: Vec<&str> = servers.split(',').map(str::trim).collect();
    if hosts
        .iter()
        .any(|h| h.is_empty() || h.contains(':') && !h.contains('['))
    {
        bail!("--servers {servers}: a number of nodes, or host names separated by commas");
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| NodePlan {
            id: i as u64 + 1,
            host: (*host).to_owned(),
            api: API_PORT,
            grpc: GRPC_PORT,
            raft: RAFT_PORT,
        })
        .collect())
}

/// `muster cluster new-node`: control node `id`'s certificate and config, from the cluster's
/// files in `dir` (its CA key and an existing node's config, whose settings it copies).
fn new_node(dir: &Path, id: u64, host: Option<String>) -> anyhow::Result<()> {
    if id == 0 {
        bail!("--id must be at least 1");
    }
    let config_path = dir.join(format!("server-{id}.toml"));
    if config_path.exists() {
        bail!(
            "--id {id}: {} exists; a new node needs an id never used in this cluster",
            config_path.display()
        );
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("--dir {}", dir.display()))?;
    // Any existing node's config names the cluster's settings; the lowest id's is as good.
    let mut existing: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name
                .strip_prefix("server-")?
                .strip_suffix(".toml")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    existing.sort();
    let Some((_, template_path)) = existing.first() else {
        bail!(
            "--dir {}: holds no server-N.toml written by `muster cluster init`",
            dir.display()
        );
    };
    let template =
        muster_control::RawServerConfig::from_toml(&std::fs::read_to_string(template_path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", template_path.display()))?;
    let tls_dir = dir.join("tls");
    let ca_key = tls_dir.join("ca.key");
    let ca = ClusterCa::from_pem(
        &std::fs::read_to_string(tls_dir.join("ca.pem")).context("reading tls/ca.pem")?,
        &std::fs::read_to_string(&ca_key).context("reading tls/ca.key")?,
    )?;
    let node = match &host {
        Some(host) => NodePlan {
            id,
            host: host.clone(),
            api: API_PORT,
            grpc: GRPC_PORT,
            raft: RAFT_PORT,
        },
        None => {
            let port = || -> anyhow::Result<u16> {
                Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port())
            };
            NodePlan {
                id,
                host: "127.0.0.1".into(),
                api: port()?,
                grpc: port()?,
                raft: port()?,
            }
        }
    };
    let local = host.is_none();
    let files = write_identity(
        &ca,
        &tls_dir,
        &format!("control-{id}"),
        &Role::Control(id),
        std::slice::from_ref(&node.host),
        Validity::from_now(NODE_CERT_VALIDITY),
    )?;
    let api_section = match &template.api_tls {
        Some(_) => {
            let mut hosts = vec![node.host.clone()];
            if local {
                hosts.push("localhost".into());
            }
            let issued = ca.issue_api(&hosts, Validity::from_now(NODE_CERT_VALIDITY))?;
            let (cert, key) = (
                tls_dir.join(format!("api-{id}.pem")),
                tls_dir.join(format!("api-{id}.key")),
            );
            write_pem(&cert, &issued.cert_pem, false)?;
            write_pem(&key, &issued.key_pem, true)?;
            format!(
                "\n[api_tls]\ncert_file = {}\nkey_file = {}\n",
                toml_string(&cert.display().to_string()),
                toml_string(&key.display().to_string()),
            )
        }
        None => String::new(),
    };
    let listen = |port: u16| {
        if local {
            node.addr(port)
        } else {
            format!("0.0.0.0:{port}")
        }
    };
    let mut peers: String = template
        .peers
        .iter()
        .map(|p| {
            peer_toml(
                p.id,
                &p.grpc_addr,
                &p.raft_addr,
                p.api_addr.as_deref().unwrap_or(""),
            )
        })
        .collect();
    peers.push_str(&peer_toml(
        id,
        &node.addr(node.grpc),
        &node.addr(node.raft),
        &node.addr(node.api),
    ));
    let data_dir = if local {
        dir.join(format!("node-{id}"))
    } else {
        PathBuf::from("/var/lib/muster/control")
    };
    let has_ca_key = template
        .tls
        .as_ref()
        .is_some_and(|t| t.ca_key_file.is_some());
    let text = server_toml(&ServerFile {
        id,
        written_by: "muster cluster new-node",
        config_path: &config_path,
        cluster_name: &template.cluster_name,
        region: &template.region,
        account_id: &template.account_id,
        listen: [listen(node.grpc), listen(node.raft), listen(node.api)],
        data_dir: &data_dir,
        founding: None,
        join_existing_cluster: true,
        tls: &files,
        ca_key: has_ca_key.then_some(ca_key.as_path()),
        api_section: &api_section,
        peers: &peers,
    });
    write_pem(&config_path, &text, true)?;
    println!(
        "Control node {id} written to {}. Start it, then add it:",
        config_path.display()
    );
    println!("  muster server --config {}", config_path.display());
    println!(
        "  muster cluster add-node --id {id} --raft-addr {} --grpc-addr {} --api-addr {}",
        node.addr(node.raft),
        node.addr(node.grpc),
        node.addr(node.api)
    );
    Ok(())
}

/// One control node's config file.
struct ServerFile<'a> {
    id: u64,
    written_by: &'a str,
    config_path: &'a Path,
    cluster_name: &'a str,
    region: &'a str,
    account_id: &'a str,
    /// Where it listens: agents, Raft, the API.
    listen: [String; 3],
    data_dir: &'a Path,
    /// The founder's settings (root credentials, defaults, join token).
    founding: Option<&'a str>,
    join_existing_cluster: bool,
    tls: &'a muster_tls::TlsFiles,
    ca_key: Option<&'a Path>,
    api_section: &'a str,
    peers: &'a str,
}

fn server_toml(f: &ServerFile) -> String {
    let [grpc, raft, api] = &f.listen;
    let mut text = format!(
        "# Control node {id} of cluster {name}, written by `{by}`.\n\
         # Start it with: muster server --config {config}\n\n\
         node_id = {id}\ngrpc_addr = {grpc}\nraft_addr = {raft}\napi_addr = {api}\n\
         data_dir = {data}\ncluster_name = {name_s}\nregion = {region_s}\naccount_id = {account_s}\n",
        id = f.id,
        by = f.written_by,
        name = f.cluster_name,
        config = f.config_path.display(),
        grpc = toml_string(grpc),
        raft = toml_string(raft),
        api = toml_string(api),
        data = toml_string(&f.data_dir.display().to_string()),
        name_s = toml_string(f.cluster_name),
        region_s = toml_string(f.region),
        account_s = toml_string(f.account_id),
    );
    if f.join_existing_cluster {
        text.push_str(
            "# This node joins the running cluster: it starts empty and waits for\n\
             # `muster cluster add-node`.\njoin_existing_cluster = true\n",
        );
    }
    if let Some(founding) = f.founding {
        text.push_str(founding);
    }
    text.push_str(&format!(
        "\n[tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
        toml_string(&f.tls.ca_file.display().to_string()),
        toml_string(&f.tls.cert_file.display().to_string()),
        toml_string(&f.tls.key_file.display().to_string()),
    ));
    if let Some(ca_key) = f.ca_key {
        text.push_str(&format!(
            "# With the CA's key this node signs the certificates of agents that join.\nca_key_file = {}\n",
            toml_string(&ca_key.display().to_string())
        ));
    }
    // Tables after the peers' array would be read as part of the last peer.
    text.push_str(f.api_section);
    text.push('\n');
    text.push_str(f.peers);
    text
}

fn peer_toml(id: u64, grpc: &str, raft: &str, api: &str) -> String {
    format!(
        "[[peers]]\nid = {id}\ngrpc_addr = {}\nraft_addr = {}\napi_addr = {}\n\n",
        toml_string(grpc),
        toml_string(raft),
        toml_string(api)
    )
}

fn toml_string(value: &str) -> String {
    serde_json::to_string(value).expect("a string serialises")
}

/// What `muster cluster init` was asked for besides its directory and servers.
#[derive(clap::Args)]
pub struct InitOptions {
    #[arg(long, default_value = "muster")]
    cluster_name: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value = "000000000000")]
    account_id: String,
    /// How long the agent join token written to agent.toml is valid, in hours.
    #[arg(long, default_value_t = 24)]
    token_ttl_hours: u64,
    /// The executor agent.toml names (`muster agent --executor` overrides it).
    #[arg(long, default_value = "docker")]
    executor: String,
    /// Serve the API over HTTPS with a certificate of the cluster's CA (the AWS config
    /// written to DIR/aws names the CA as its `ca_bundle`).
    #[arg(long)]
    api_tls: bool,
}

fn init(dir: &Path, servers: &str, options: &InitOptions) -> anyhow::Result<()> {
    let (cluster_name, region, account_id, executor) = (
        options.cluster_name.as_str(),
        options.region.as_str(),
        options.account_id.as_str(),
        options.executor.as_str(),
    );
    let (token_ttl_hours, api_tls) = (options.token_ttl_hours, options.api_tls);
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("--dir {}: must be new or empty", dir.display());
    }
    if !matches!(executor, "docker" | "process") {
        bail!("--executor {executor}: must be docker or process");
    }
    if !(1..=365 * 24).contains(&token_ttl_hours) {
        bail!("--token-ttl-hours must be 1 to 8760 (a year)");
    }
    muster_core::ArnScope {
        region: region.to_owned(),
        account: account_id.to_owned(),
    }
    .check()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let nodes = plan(servers)?;
    let local = nodes.iter().all(|n| n.host == "127.0.0.1");
    let tls_dir = dir.join("tls");
    let ca = ClusterCa::generate(cluster_name)?;
    let ca_key = tls_dir.join("ca.key");
    write_pem(&ca_key, ca.key_pem(), true)?;

    let peers: String = nodes
        .iter()
        .map(|n| peer_toml(n.id, &n.addr(n.grpc), &n.addr(n.raft), &n.addr(n.api)))
        .collect();
    let (token_id, secret) = muster_tls::join::new_token();
    let expires = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + token_ttl_hours * 3600;
    let founder = &nodes[0];
    let scheme = if api_tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", founder.addr(founder.api));
    // One certificate for every node's API, naming every host.
    let api_section = if api_tls {
        let mut hosts: Vec<String> = nodes.iter().map(|n| n.host.clone()).collect();
        hosts.dedup();
        if local {
            hosts.push("localhost".into());
        }
        let issued = ca.issue_api(&hosts, Validity::from_now(NODE_CERT_VALIDITY))?;
        let (cert, key) = (tls_dir.join("api.pem"), tls_dir.join("api.key"));
        write_pem(&cert, &issued.cert_pem, false)?;
        write_pem(&key, &issued.key_pem, true)?;
        format!(
            "\n# The AWS Batch API over HTTPS; clients trust the cluster CA (AWS_CA_BUNDLE).\n[api_tls]\ncert_file = {}\nkey_file = {}\n",
            toml_string(&cert.display().to_string()),
            toml_string(&key.display().to_string()),
        )
    } else {
        String::new()
    };
    let aws_dir = dir.join("aws");
    for node in &nodes {
        let files = write_identity(
            &ca,
            &tls_dir,
            &format!("control-{}", node.id),
            &Role::Control(node.id),
            std::slice::from_ref(&node.host),
            Validity::from_now(NODE_CERT_VALIDITY),
        )?;
        let data_dir = if local {
            dir.join(format!("node-{}", node.id))
        } else {
            PathBuf::from("/var/lib/muster/control")
        };
        let listen = |port: u16| {
            if local {
                node.addr(port)
            } else {
                format!("0.0.0.0:{port}")
            }
        };
        let founding = (node.id == founder.id).then(|| {
            format!(
                "# The founder makes the root user (its key is in {aws}), the `default` compute\n\
                 # environment and job queue, and records the agents' join token.\n\
                 root_credentials_dir = {aws_s}\nfound_with_defaults = true\n\n\
                 [founding_join_token]\nid = {id}\nsecret_sha256 = {digest}\nexpires_at_unix = {expires}\n",
                aws = aws_dir.display(),
                aws_s = toml_string(&aws_dir.display().to_string()),
                id = toml_string(&token_id),
                digest = toml_string(&muster_sigv4::sha256_hex(secret.as_bytes())),
            )
        });
        let text = server_toml(&ServerFile {
            id: node.id,
            written_by: "muster cluster init",
            config_path: &dir.join(format!("server-{}.toml", node.id)),
            cluster_name,
            region,
            account_id,
            listen: [listen(node.grpc), listen(node.raft), listen(node.api)],
            data_dir: &data_dir,
            founding: founding.as_deref(),
            join_existing_cluster: false,
            tls: &files,
            ca_key: Some(&ca_key),
            api_section: &api_section,
            peers: &peers,
        });
        write_pem(&dir.join(format!("server-{}.toml", node.id)), &text, true)?;
    }

    let control_plane: Vec<String> = nodes.iter().map(|n| toml_string(&n.addr(n.grpc))).collect();
    let fingerprint = muster_tls::pki::fingerprint(ca.cert_pem())?;
    let work_dir = if local {
        dir.join("agent").display().to_string()
    } else {
        "/var/lib/muster/agent".to_owned()
    };
    let agent = format!(
        "# An agent of cluster {cluster_name}, written by `muster cluster init`. Copy it to each\n\
         # worker and start: muster agent --config agent.toml\n\
         # On first start the agent makes its key, joins with the token below (valid until\n\
         # {expires} s since the epoch; `muster cluster token create` makes more) and keeps its\n\
         # certificate in work_dir/tls. Its name is the host name unless node_id is set.\n\n\
         compute_environment = \"default\"\ncontrol_plane = [{}]\nexecutor = {}\nwork_dir = {}\n\
         join_token = {}\nca_fingerprint = {}\n",
        control_plane.join(", "),
        toml_string(executor),
        toml_string(&work_dir),
        toml_string(&format!("{token_id}.{secret}")),
        toml_string(&fingerprint),
    );
    write_pem(&dir.join("agent.toml"), &agent, true)?;

    // The root user's key, made here so the files exist before the cluster does; the founder
    // records it in the cluster when it founds it.
    let credentials = muster_control::bootstrap::new_credentials();
    write_pem(
        &aws_dir.join("credentials"),
        &format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            credentials.access_key_id, credentials.secret_access_key
        ),
        true,
    )?;
    write_pem(
        &aws_dir.join("config"),
        &format!(
            "[default]\nregion = {region}\noutput = json\nendpoint_url = {endpoint}\n{}",
            if api_tls {
                format!("ca_bundle = {}\n", tls_dir.join("ca.pem").display())
            } else {
                String::new()
            }
        ),
        false,
    )?;

    println!("Cluster {cluster_name} written to {}:", dir.display());
    for node in &nodes {
        println!(
            "  muster server --config {}   (API {})",
            dir.join(format!("server-{}.toml", node.id)).display(),
            node.addr(node.api)
        );
    }
    println!(
        "  muster agent --config {}",
        dir.join("agent.toml").display()
    );
    println!(
        "Then: AWS_CONFIG_FILE={} AWS_SHARED_CREDENTIALS_FILE={} aws batch describe-job-queues",
        aws_dir.join("config").display(),
        aws_dir.join("credentials").display()
    );
    Ok(())
}
