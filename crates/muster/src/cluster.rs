//! `muster cluster`: founding a cluster's files (`init`), and who may join it (`token`,
//! `node revoke`).

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
    /// Every token (never their secrets) and every revoked agent.
    List,
    /// No agent joins with the token from now on.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Cut the agent off for good: every call its certificate makes is refused, and it never
    /// joins again under that name; its running jobs are retried elsewhere once it is lost.
    Revoke { name: String },
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
    match command {
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
            command: NodeCommand::Revoke { name },
        } => {
            let client = muster_client::BatchClient::from_environment(endpoint_url)?;
            let answer = client
                .call_cluster("RevokeAgent", serde_json::json!({"node": name}))
                .await;
            crate::print_answer("RevokeAgent", answer, false)
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
        .map(|n| {
            format!(
                "[[peers]]\nid = {}\ngrpc_addr = {}\nraft_addr = {}\n\n",
                n.id,
                toml_string(&n.addr(n.grpc)),
                toml_string(&n.addr(n.raft))
            )
        })
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
        let mut text = format!(
            "# Control node {id} of cluster {name}, written by `muster cluster init`.\n\
             # Start it with: muster server --config {config}\n\n\
             node_id = {id}\ngrpc_addr = {grpc}\nraft_addr = {raft}\napi_addr = {api}\n\
             data_dir = {data}\ncluster_name = {name_s}\nregion = {region_s}\naccount_id = {account_s}\n",
            id = node.id,
            name = cluster_name,
            config = dir.join(format!("server-{}.toml", node.id)).display(),
            grpc = toml_string(&listen(node.grpc)),
            raft = toml_string(&listen(node.raft)),
            api = toml_string(&listen(node.api)),
            data = toml_string(&data_dir.display().to_string()),
            name_s = toml_string(cluster_name),
            region_s = toml_string(region),
            account_s = toml_string(account_id),
        );
        if node.id == founder.id {
            text.push_str(&format!(
                "# The founder makes the root user (its key is in {aws}), the `default` compute\n\
                 # environment and job queue, and records the agents' join token.\n\
                 root_credentials_dir = {aws_s}\nfound_with_defaults = true\n\n\
                 [founding_join_token]\nid = {id}\nsecret_sha256 = {digest}\nexpires_at_unix = {expires}\n",
                aws = aws_dir.display(),
                aws_s = toml_string(&aws_dir.display().to_string()),
                id = toml_string(&token_id),
                digest = toml_string(&muster_sigv4::sha256_hex(secret.as_bytes())),
            ));
        }
        text.push_str(&format!(
            "\n[tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n# With the CA's key this node signs the certificates of agents that join.\nca_key_file = {}\n\n{peers}",
            toml_string(&files.ca_file.display().to_string()),
            toml_string(&files.cert_file.display().to_string()),
            toml_string(&files.key_file.display().to_string()),
            toml_string(&ca_key.display().to_string()),
        ));
        // Tables after the peers' array would be read as part of the last peer.
        let peers_at = text.find("[[peers]]").unwrap_or(text.len());
        text.insert_str(peers_at, &api_section);
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
