//! Agent configuration: TOML → [`RawAgentConfig`] → `validate()` → [`AgentConfig`].

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserved {
    #[serde(default)]
    pub vcpus: f64,
    #[serde(default)]
    pub memory_mib: u64,
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot parse config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl RawAgentConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
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
        let node_id = match self.node_id {
            Some(id) if !id.is_empty() => id,
            _ => crate::inventory::hostname(),
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
        })
    }
}
