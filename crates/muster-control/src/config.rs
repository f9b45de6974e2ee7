//! Control node configuration: TOML → [`RawServerConfig`] → `validate()` → [`ServerConfig`].

use muster_raft::PeerAddrs;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    /// The peer's gRPC address for agents.
    pub grpc_addr: String,
    /// The peer's gRPC address for the other control nodes (Raft).
    pub raft_addr: String,
    /// The peer's AWS Batch API, shown by `muster cluster status`.
    #[serde(default)]
    pub api_addr: Option<String>,
}

/// The file as written. See `deploy/config/server.example.toml` for every field explained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerConfig {
    pub node_id: u64,
    pub grpc_addr: String,
    pub raft_addr: String,
    pub api_addr: String,
    pub data_dir: PathBuf,
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Days a job is kept after it ended.
    #[serde(default = "default_retention_days")]
    pub job_retention_days: u64,
    /// Seconds an ended job stays in memory before it moves to the archive on disk.
    #[serde(default = "default_ended_jobs_in_memory_secs")]
    pub ended_jobs_in_memory_secs: u64,
    /// Log entries between two snapshots of the state; the log before a snapshot is then
    /// dropped, all but the newest entries (as many as this, at most 1,000), and a node
    /// further behind is sent the snapshot instead.
    #[serde(default = "default_snapshot_every_entries")]
    pub snapshot_every_entries: u64,
    /// Most `dependsOn` entries one SubmitJob may carry (AWS allows 20).
    #[serde(default = "default_max_depends_on")]
    pub max_depends_on: usize,
    /// Seconds without a heartbeat after which the leader marks an agent lost.
    #[serde(default = "default_node_lost_after_secs")]
    pub node_lost_after_secs: u64,
    /// The region every ARN names and requests must be signed for. Read when the cluster is
    /// founded; the cluster keeps it from then on.
    #[serde(default = "default_region")]
    pub region: String,
    /// The twelve-digit account every ARN names. Read when the cluster is founded.
    #[serde(default = "default_account_id")]
    pub account_id: String,
    /// The cluster CA, this node's certificate and key: TLS on every internal port.
    #[serde(default)]
    pub tls: Option<muster_tls::TlsFiles>,
    /// Without `tls`, this must be set to run the internal ports in plaintext, where they
    /// trust whoever connects (SECURITY.md).
    #[serde(default)]
    pub plaintext: bool,
    /// Where the founding node writes (or finds, when `muster cluster init` made it) the
    /// first administrator's `credentials` and `config`; by default `data_dir/aws`.
    #[serde(default)]
    pub root_credentials_dir: Option<PathBuf>,
    /// The founding node also creates the `default` compute environment (UNMANAGED) and job
    /// queue, as `muster dev` has them (on unless set to `false`).
    #[serde(default = "yes")]
    pub found_with_defaults: bool,
    /// A join token the founding node records when it founds the cluster (written by
    /// `muster cluster init`; the config holds only its secret's SHA-256).
    #[serde(default)]
    pub founding_join_token: Option<FoundingJoinToken>,
    /// Serve the AWS Batch API over HTTPS with this certificate and key (the cluster CA's,
    /// from `muster cluster init --api-tls`, or an operator's). Clients trust it with
    /// `AWS_CA_BUNDLE` (or `ca_bundle` in their AWS config).
    #[serde(default)]
    pub api_tls: Option<muster_tls::ApiTlsFiles>,
    /// This node joins a running cluster rather than founding one: it starts empty and waits
    /// until `muster cluster add-node` adds it (etcd's `initial-cluster-state = existing`).
    #[serde(default)]
    pub join_existing_cluster: bool,
}

/// See [`RawServerConfig::founding_join_token`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FoundingJoinToken {
    pub id: String,
    pub secret_sha256: String,
    /// Seconds since the epoch.
    pub expires_at_unix: u64,
}

fn yes() -> bool {
    true
}

fn default_region() -> String {
    muster_core::ArnScope::default().region
}

fn default_account_id() -> String {
    muster_core::ArnScope::default().account
}

fn default_snapshot_every_entries() -> u64 {
    muster_raft::SNAPSHOT_EVERY_ENTRIES
}

fn default_max_depends_on() -> usize {
    muster_api::Limits::default().max_depends_on
}

/// Heartbeat silence after which the leader marks an agent lost, unless configured.
pub const DEFAULT_NODE_LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// How long an ended job is kept, unless configured (`job_retention_days`).
pub const DEFAULT_JOB_RETENTION_DAYS: u64 = 7;

fn default_node_lost_after_secs() -> u64 {
    DEFAULT_NODE_LOST_AFTER.as_secs()
}

fn default_retention_days() -> u64 {
    DEFAULT_JOB_RETENTION_DAYS
}

fn default_ended_jobs_in_memory_secs() -> u64 {
    crate::housekeeping::DEFAULT_ENDED_JOBS_IN_MEMORY.as_secs()
}

fn default_cluster_name() -> String {
    "muster".to_owned()
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    /// Where agents connect.
    pub grpc_addr: SocketAddr,
    /// Where the other control nodes connect.
    pub raft_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub cluster_name: String,
    /// Every voter's addresses, this node's included.
    pub peers: BTreeMap<u64, PeerAddrs>,
    /// Where the founding node writes the first administrator's credentials (`None`: the
    /// caller bootstraps them itself, as `muster dev` does).
    pub root_credentials_dir: Option<PathBuf>,
    /// How long an agent may stay silent before its node is marked lost.
    pub node_lost_after: std::time::Duration,
    /// Log entries between two snapshots (`snapshot_every_entries`).
    pub snapshot_every_entries: u64,
    /// How long an ended job stays in memory, then on disk before it is purged.
    pub history: crate::JobHistory,
    /// API limits. Not read from config files: only tests lower the AWS minimums.
    pub limits: muster_api::Limits,
    /// The command level this node reports (`muster_core::COMMAND_LEVEL`). Not read from
    /// config files: only tests lower it, standing in for a node of an earlier release.
    pub command_level: u32,
    /// The region and account a cluster this node founds names in its ARNs.
    pub scope: muster_core::ArnScope,
    /// What this node presents and trusts on its internal ports; `None`: plaintext.
    pub tls: Option<std::sync::Arc<muster_tls::Identity>>,
    /// Where `tls` was read from: a node holding the CA's key renews its own certificate
    /// there before it expires.
    pub tls_files: Option<muster_tls::TlsFiles>,
    /// See [`RawServerConfig::found_with_defaults`].
    pub found_with_defaults: bool,
    /// See [`RawServerConfig::founding_join_token`].
    pub founding_join_token: Option<FoundingJoinToken>,
    /// The API's TLS; `None`: plain HTTP.
    pub api_tls: Option<std::sync::Arc<muster_tls::ServerTlsConfig>>,
    /// The cluster CA with its key (`tls.ca_key_file`): this node signs joining agents'
    /// certificates. `None`: agents cannot join through this node.
    pub ca: Option<std::sync::Arc<muster_tls::pki::ClusterCa>>,
    /// See [`RawServerConfig::join_existing_cluster`].
    pub join_existing_cluster: bool,
}

pub use muster_core::ConfigError;

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, message)
}

impl RawServerConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn validate(self) -> Result<ServerConfig, ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be at least 1"));
        }
        let listener = |field: &'static str, addr: &str| -> Result<SocketAddr, ConfigError> {
            addr.parse()
                .map_err(|e| invalid(field, format!("{addr}: {e}")))
        };
        let grpc_addr = listener("grpc_addr", &self.grpc_addr)?;
        let raft_addr = listener("raft_addr", &self.raft_addr)?;
        let api_addr = listener("api_addr", &self.api_addr)?;
        if raft_addr == grpc_addr || raft_addr == api_addr {
            return Err(invalid(
                "raft_addr",
                "must differ from grpc_addr and api_addr: Raft has a listener of its own",
            ));
        }
        if grpc_addr == api_addr {
            return Err(invalid("api_addr", "must differ from grpc_addr"));
        }
        let this_node = PeerAddrs {
            raft: self.raft_addr.clone(),
            agents: self.grpc_addr.clone(),
            api: self.api_addr.clone(),
        };
        let mut peers = BTreeMap::new();
        for p in self.peers {
            let addrs = PeerAddrs {
                raft: p.raft_addr,
                agents: p.grpc_addr,
                api: p.api_addr.unwrap_or_default(),
            };
            if peers.insert(p.id, addrs).is_some() {
                return Err(invalid(
                    "peers",
                    format!("node id {} is listed twice", p.id),
                ));
            }
        }
        // Peers name the addresses the others reach this node at; it may listen on all
        // interfaces (`0.0.0.0:7102`), where only the port must agree.
        let reached_at = |listed: &str, listen: &SocketAddr| {
            listed == listen.to_string()
                || (listen.ip().is_unspecified()
                    && listed
                        .rsplit_once(':')
                        .is_some_and(|(_, port)| port == listen.port().to_string()))
        };
        match peers.get_mut(&self.node_id) {
            Some(listed)
                if !reached_at(&listed.raft, &raft_addr)
                    || !reached_at(&listed.agents, &grpc_addr) =>
            {
                return Err(invalid(
                    "peers",
                    format!(
                        "this node ({}) is listed at {} (Raft) and {} (agents), which are not where it listens (raft_addr {raft_addr}, grpc_addr {grpc_addr})",
                        self.node_id, listed.raft, listed.agents
                    ),
                ));
            }
            Some(listed) => {
                if listed.api.is_empty() && !api_addr.ip().is_unspecified() {
                    listed.api = api_addr.to_string();
                }
            }
            None => {
                peers.insert(self.node_id, this_node);
            }
        }
        if self.job_retention_days == 0 {
            return Err(invalid("job_retention_days", "must be at least 1"));
        }
        if self.snapshot_every_entries < 10 {
            return Err(invalid("snapshot_every_entries", "must be at least 10"));
        }
        if self.node_lost_after_secs < 2 {
            return Err(invalid("node_lost_after_secs", "must be at least 2"));
        }
        let scope = muster_core::ArnScope {
            region: self.region,
            account: self.account_id,
        };
        scope.check()?;
        let ca = match self
            .tls
            .as_ref()
            .and_then(|files| files.ca_key_file.as_ref().map(|key| (files, key)))
        {
            Some((files, key_file)) => {
                let read = |setting: &'static str, path: &std::path::Path| {
                    std::fs::read_to_string(path).map_err(|e| {
                        invalid(
                            "tls",
                            format!("tls.{setting} ({}): cannot read it: {e}", path.display()),
                        )
                    })
                };
                let cert = read("ca_file", &files.ca_file)?;
                let key = read("ca_key_file", key_file)?;
                let ca = muster_tls::pki::ClusterCa::from_pem(&cert, &key).map_err(|e| {
                    invalid(
                        "tls",
                        format!(
                            "tls.ca_key_file ({}): not the key of tls.ca_file's CA: {e}",
                            key_file.display()
                        ),
                    )
                })?;
                Some(std::sync::Arc::new(ca))
            }
            None => None,
        };
        let tls_files = self.tls.clone();
        let tls = match (self.tls, self.plaintext) {
            (Some(_), true) => {
                return Err(invalid(
                    "plaintext",
                    "cannot be set together with a [tls] section",
                ));
            }
            (Some(files), false) => {
                let identity = muster_tls::renew::load_finishing_renewal("tls", &files)
                    .map_err(|e| invalid("tls", e.to_string()))?;
                if *identity.role() != muster_tls::Role::Control(self.node_id) {
                    return Err(invalid(
                        "tls",
                        format!(
                            "tls.cert_file ({}) is the certificate of {}, not of control node {}",
                            files.cert_file.display(),
                            identity.role(),
                            self.node_id
                        ),
                    ));
                }
                Some(std::sync::Arc::new(identity))
            }
            (None, true) => None,
            (None, false) => {
                return Err(invalid(
                    "tls",
                    "is required: `muster cluster init` makes a cluster's certificates and configs; \
                     `plaintext = true` runs the internal ports without TLS, trusting anyone who \
                     reaches them (see SECURITY.md)",
                ));
            }
        };
        Ok(ServerConfig {
            join_existing_cluster: self.join_existing_cluster,
            tls,
            tls_files,
            found_with_defaults: self.found_with_defaults,
            founding_join_token: self.founding_join_token,
            api_tls: self
                .api_tls
                .as_ref()
                .map(muster_tls::api_server_config)
                .transpose()
                .map_err(|e| invalid("api_tls", e.to_string()))?,
            ca,
            node_lost_after: std::time::Duration::from_secs(self.node_lost_after_secs),
            snapshot_every_entries: self.snapshot_every_entries,
            history: crate::JobHistory {
                in_memory: std::time::Duration::from_secs(self.ended_jobs_in_memory_secs),
                retention: std::time::Duration::from_secs(self.job_retention_days * 86_400),
            },
            limits: muster_api::Limits {
                max_depends_on: self.max_depends_on,
                ..Default::default()
            },
            command_level: muster_core::COMMAND_LEVEL,
            root_credentials_dir: Some(
                self.root_credentials_dir
                    .unwrap_or_else(|| self.data_dir.join("aws")),
            ),
            scope,
            node_id: self.node_id,
            grpc_addr,
            raft_addr,
            api_addr,
            data_dir: self.data_dir,
            cluster_name: self.cluster_name,
            peers,
        })
    }
}
