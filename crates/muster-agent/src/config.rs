//! Agent configuration: TOML → [`RawAgentConfig`] → `validate()` → [`AgentConfig`].

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// When the Docker executor pulls an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImagePull {
    /// Pull an image this host does not have (as AWS Batch's agents do).
    #[default]
    IfMissing,
    /// Never pull: a missing image fails the attempt at once.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Docker,
    Process,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Docker => "docker",
            ExecutorKind::Process => "process",
        }
    }
}

/// The file as written. See `deploy/config/agent.example.toml` for every field explained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentConfig {
    pub node_id: Option<String>,
    pub compute_environment: String,
    pub control_plane: Vec<String>,
    pub executor: ExecutorKind,
    pub work_dir: PathBuf,
    #[serde(default)]
    pub reserved: Reserved,
    /// Offer this many vCPUs instead of the machine's count (before reservations).
    pub vcpus: Option<f64>,
    /// Offer this much memory (MiB) instead of the machine's (before reservations).
    pub memory_mib: Option<u64>,
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    #[serde(default = "default_stop_grace_secs")]
    pub stop_grace_secs: u64,
    /// Seconds without reaching any control node after which the agent stops its attempts
    /// itself. Keep it below the servers' `node_lost_after_secs`, so that an attempt the
    /// cluster retries elsewhere is never still running here.
    #[serde(default = "default_stop_after_secs")]
    pub stop_after_secs: u64,
    /// The network topology domain this machine sits in (a switch, a placement group);
    /// reported as the `topology-domain` label.
    pub topology_domain: Option<String>,
    /// Where this machine sits in the network, widest level first, each `level=name`:
    /// `["block=b1", "rack=r12", "switch=s3"]`. Multi-node jobs take the narrowest domain
    /// that holds them (Slurm's tree topology); reported as the `topology` label
    /// (`block=b1/rack=r12/switch=s3`) and one `topology.<level>` label per level.
    #[serde(default)]
    pub topology: Vec<String>,
    /// Free-form labels jobs may require with `muster:node.<label>` tags.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The address this machine's jobs are reached at by the other nodes of a multi-node job
    /// (`AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS`, `MUSTER_NODE_ADDRESSES`). By default
    /// the address of the interface the host's default route leaves by, else 127.0.0.1.
    pub private_address: Option<std::net::IpAddr>,
    /// Where the log service listens for control nodes reading attempt output.
    #[serde(default = "default_log_listen_addr")]
    pub log_listen_addr: std::net::SocketAddr,
    /// The `host:port` control nodes use to reach the log service (by default this host's
    /// name, or the listen address when it names one).
    pub log_advertise_address: Option<String>,
    /// Days attempt output is kept after it was last written.
    #[serde(default = "default_log_retention_days")]
    pub log_retention_days: u64,
    /// `if-missing` (default) or `never`.
    #[serde(default)]
    pub image_pull: ImagePull,
    /// A pull taking longer fails the attempt.
    #[serde(default = "default_image_pull_timeout_secs")]
    pub image_pull_timeout_secs: u64,
    /// Whether this machine runs containers that reach into it (privileged, with devices or
    /// added capabilities); their definitions also need the registering caller's allowance.
    #[serde(default)]
    pub allow_privileged: bool,
    /// Host paths jobs may mount (a listed folder allows what is below it, except `/` and an
    /// engine's `*.sock`, which must be listed themselves). None by default.
    #[serde(default)]
    pub allowed_host_paths: Vec<String>,
    /// The cluster CA, this agent's certificate and key: TLS to every control node, and for
    /// the log service. The certificate names the agent; `node_id` may be left out then.
    #[serde(default)]
    pub tls: Option<muster_tls::TlsFiles>,
    /// Without `tls`, this must be set to talk to control nodes in plaintext.
    #[serde(default)]
    pub plaintext: bool,
    /// Instead of `tls`: a join token (`muster cluster token create`) with which the agent
    /// has its own key's certificate signed on first start, kept in `work_dir/tls`.
    #[serde(default)]
    pub join_token: Option<String>,
    /// The SHA-256 fingerprint of the cluster CA (`sha256:<hex>`), which the agent trusts
    /// when it joins; written beside the token by `muster cluster init`.
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
}

impl RawAgentConfig {
    /// An agent of `compute_environment` reaching `control_plane`, with every other setting
    /// at the default a config file gets when it leaves it out (and its log service on a
    /// free loopback port, for agents started in-process).
    pub fn new(
        node_id: &str,
        compute_environment: &str,
        control_plane: Vec<String>,
        executor: ExecutorKind,
        work_dir: PathBuf,
    ) -> Self {
        Self {
            node_id: Some(node_id.to_owned()),
            compute_environment: compute_environment.to_owned(),
            control_plane,
            executor,
            work_dir,
            reserved: Reserved::default(),
            vcpus: None,
            memory_mib: None,
            heartbeat_secs: default_heartbeat_secs(),
            stop_grace_secs: default_stop_grace_secs(),
            stop_after_secs: default_stop_after_secs(),
            topology_domain: None,
            topology: Vec::new(),
            labels: BTreeMap::new(),
            private_address: None,
            log_listen_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            log_advertise_address: None,
            log_retention_days: default_log_retention_days(),
            image_pull: ImagePull::default(),
            image_pull_timeout_secs: default_image_pull_timeout_secs(),
            allow_privileged: false,
            allowed_host_paths: Vec::new(),
            tls: None,
            plaintext: false,
            join_token: None,
            ca_fingerprint: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserved {
    #[serde(default)]
    pub vcpus: f64,
    #[serde(default)]
    pub memory_mib: u64,
}

pub use muster_core::{TOPOLOGY_DOMAIN_LABEL, TOPOLOGY_LABEL};

/// Past the control node's ports (API 7070, agents 7101, Raft 7102), so that an agent and a
/// control node on one host do not collide by default.
pub const DEFAULT_LOG_PORT: u16 = 7103;

fn default_log_listen_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], DEFAULT_LOG_PORT))
}

fn default_image_pull_timeout_secs() -> u64 {
    600
}

fn default_log_retention_days() -> u64 {
    7
}

fn default_heartbeat_secs() -> u64 {
    2
}

fn default_stop_after_secs() -> u64 {
    20
}

fn default_stop_grace_secs() -> u64 {
    10
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub compute_environment: String,
    pub control_plane: Vec<String>,
    pub executor: ExecutorKind,
    pub work_dir: PathBuf,
    pub reserved_millicpus: u64,
    pub reserved_memory_mib: u64,
    pub vcpus_override: Option<u64>,
    pub memory_override_mib: Option<u64>,
    pub heartbeat: Duration,
    /// Between SIGTERM and SIGKILL when an attempt is stopped.
    pub stop_grace: Duration,
    /// Cut off from every control node this long, the agent stops its attempts.
    pub stop_after: Duration,
    /// Labels from the config, `topology-domain` included.
    pub labels: BTreeMap<String, String>,
    pub log_listen_addr: std::net::SocketAddr,
    pub log_advertise_address: Option<String>,
    /// What the nodes of a multi-node job reach this machine's jobs at.
    pub private_address: std::net::IpAddr,
    pub log_retention: Duration,
    pub image_pull: ImagePull,
    pub image_pull_timeout: Duration,
    /// What this machine lets containers reach (see [`RawAgentConfig::allow_privileged`]).
    pub allowances: Allowances,
    /// What this agent presents and trusts; `None`: plaintext, or not joined yet.
    pub tls: Option<std::sync::Arc<muster_tls::Identity>>,
    /// How to get `tls` on start (see [`crate::join`]).
    pub join: Option<crate::join::JoinSettings>,
}

/// What of this machine an agent lets its containers reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowances {
    pub privileged: bool,
    pub host_paths: Vec<String>,
}

impl Allowances {
    /// Why these options may not run here, if they may not: the agent re-checks what the API
    /// let through, for its machine's operator decides what it exposes.
    pub fn refusal(&self, options: &muster_core::ContainerOptions) -> Option<String> {
        options.escapes().into_iter().find_map(|escape| {
            let allowed = match &escape {
                muster_core::Escape::HostPath(path) => {
                    muster_core::host_path_allowed(path, &self.host_paths)
                }
                _ => self.privileged,
            };
            (!allowed).then(|| {
                let setting = match escape {
                    muster_core::Escape::HostPath(_) => "allowed_host_paths",
                    _ => "allow_privileged",
                };
                format!("{escape} is not allowed by this agent's {setting}")
            })
        })
    }
}

pub use muster_core::ConfigError;

impl RawAgentConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            field,
            message: message.to_owned(),
        };
        if self.control_plane.is_empty() {
            return Err(invalid(
                "control_plane",
                "list at least one control node gRPC address",
            ));
        }
        if self.compute_environment.is_empty() {
            return Err(invalid(
                "compute_environment",
                "must name the UNMANAGED compute environment to join",
            ));
        }
        if self.reserved.vcpus < 0.0 {
            return Err(invalid("reserved.vcpus", "must not be negative"));
        }
        // `vcpus` and `memory_mib` offer less than the machine has, never more: jobs placed on
        // capacity that is not there would starve each other.
        let machine_millicpus = crate::inventory::machine_millicpus();
        if let Some(vcpus) = self.vcpus
            && (vcpus <= 0.0 || (vcpus * 1000.0).round() as u64 > machine_millicpus)
        {
            return Err(invalid(
                "vcpus",
                &format!(
                    "{vcpus}: must be more than 0 and at most this machine's {} vCPUs (it offers less than the machine has, never more)",
                    machine_millicpus as f64 / 1000.0
                ),
            ));
        }
        let machine_memory = crate::inventory::machine_memory_mib();
        if let Some(memory) = self.memory_mib
            && (memory == 0 || memory > machine_memory)
        {
            return Err(invalid(
                "memory_mib",
                &format!(
                    "{memory}: must be more than 0 and at most this machine's {machine_memory} MiB (it offers less than the machine has, never more)"
                ),
            ));
        }
        let mut labels = self.labels;
        if let Some(domain) = self.topology_domain {
            labels.insert(TOPOLOGY_DOMAIN_LABEL.to_owned(), domain);
        }
        if !self.topology.is_empty() {
            let mut levels = Vec::new();
            for entry in &self.topology {
                let part_ok = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                };
                match entry.split_once('=') {
                    Some((level, name))
                        if part_ok(level) && part_ok(name) && !levels.contains(&level) =>
                    {
                        levels.push(level);
                        labels.insert(format!("{TOPOLOGY_LABEL}.{level}"), name.to_owned());
                    }
                    _ => {
                        return Err(invalid(
                            "topology",
                            &format!(
                                "{entry:?}: each level is level=name (letters, digits, - _ . :), each level once, widest first"
                            ),
                        ));
                    }
                }
            }
            labels.insert(TOPOLOGY_LABEL.to_owned(), self.topology.join("/"));
        }
        for (key, value) in &labels {
            let valid = |s: &str| {
                !s.is_empty()
                    && s.len() <= 128
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
            };
            if !valid(key) {
                return Err(invalid(
                    "labels",
                    &format!("{key:?}: a label is 1 to 128 letters, digits and - _ . / :"),
                ));
            }
            if value.len() > 256 {
                return Err(invalid(
                    "labels",
                    &format!("{key}: value over 256 characters"),
                ));
            }
        }
        if let Some(bad) = self
            .allowed_host_paths
            .iter()
            .find(|p| !p.starts_with('/') || p.split('/').any(|part| part == ".."))
        {
            return Err(invalid(
                "allowed_host_paths",
                &format!("{bad}: every entry must be an absolute path without .."),
            ));
        }
        let join = match (self.join_token, self.ca_fingerprint) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "ca_fingerprint",
                    "is required with join_token: the agent trusts only the CA it names",
                ));
            }
            // Without a token: joined before, its certificate kept in work_dir/tls.
            (token, Some(ca_fingerprint)) => {
                if self.tls.is_some() || self.plaintext {
                    return Err(invalid(
                        "join_token",
                        "cannot be set together with [tls] or plaintext",
                    ));
                }
                let hex = ca_fingerprint.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid(
                        "ca_fingerprint",
                        "must be sha256: and 64 hex digits, as `muster cluster init` writes it",
                    ));
                }
                if token.as_ref().is_some_and(|t| !t.contains('.')) {
                    return Err(invalid("join_token", "must be <id>.<secret>"));
                }
                Some(crate::join::JoinSettings {
                    token,
                    ca_fingerprint: ca_fingerprint.to_ascii_lowercase(),
                })
            }
        };
        let tls = match (self.tls, self.plaintext) {
            (Some(_), true) => {
                return Err(invalid(
                    "plaintext",
                    "cannot be set together with a [tls] section",
                ));
            }
            (None, false) if join.is_some() => None,
            (Some(files), false) => Some(std::sync::Arc::new(
                muster_tls::Identity::load("tls", &files).map_err(|e| ConfigError::Invalid {
                    field: "tls",
                    message: e.to_string(),
                })?,
            )),
            (None, true) => None,
            (None, false) => {
                return Err(invalid(
                    "tls",
                    "is required: `muster cluster init` writes an agent's config; \
                     `plaintext = true` talks to the control plane without TLS",
                ));
            }
        };
        let certified = tls.as_ref().map(|identity| match identity.role() {
            muster_tls::Role::Agent(name) => Ok(name.clone()),
            other => Err(ConfigError::Invalid {
                field: "tls",
                message: format!("the certificate is {other}'s, not an agent's"),
            }),
        });
        let certified = certified.transpose()?;
        let node_id = match (self.node_id.filter(|id| !id.is_empty()), certified) {
            (Some(id), Some(name)) if id != name => {
                return Err(ConfigError::Invalid {
                    field: "node_id",
                    message: format!(
                        "{id} differs from the name in the agent's certificate ({name})"
                    ),
                });
            }
            (Some(id), _) => id,
            (None, Some(name)) => name,
            (None, None) => crate::inventory::hostname(),
        };
        Ok(AgentConfig {
            node_id,
            compute_environment: self.compute_environment,
            control_plane: self.control_plane,
            executor: self.executor,
            work_dir: self.work_dir,
            reserved_millicpus: (self.reserved.vcpus * 1000.0).round() as u64,
            reserved_memory_mib: self.reserved.memory_mib,
            vcpus_override: self.vcpus.map(|v| (v * 1000.0).round() as u64),
            memory_override_mib: self.memory_mib,
            // Heartbeats also prove contact for `stop_after`: beat at least three times in it.
            heartbeat: std::time::Duration::from_secs(self.heartbeat_secs.max(1))
                .min(std::time::Duration::from_secs(self.stop_after_secs.max(1)) / 3),
            stop_grace: std::time::Duration::from_secs(self.stop_grace_secs),
            stop_after: std::time::Duration::from_secs(self.stop_after_secs.max(1)),
            labels,
            log_listen_addr: self.log_listen_addr,
            log_advertise_address: self.log_advertise_address,
            private_address: self
                .private_address
                .unwrap_or_else(crate::inventory::default_private_address),
            log_retention: Duration::from_secs(self.log_retention_days.max(1) * 86_400),
            image_pull: self.image_pull,
            image_pull_timeout: Duration::from_secs(self.image_pull_timeout_secs.max(1)),
            allowances: Allowances {
                privileged: self.allow_privileged,
                host_paths: self.allowed_host_paths,
            },
            tls,
            join,
        })
    }
}
