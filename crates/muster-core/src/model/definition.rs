//! Job definitions: the immutable, revisioned templates jobs are submitted from.

use super::Tags;
use crate::{Arn, Resources};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `resourceRequirements[].type`
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceType {
    Vcpu,
    Memory,
    Gpu,
}

impl ResourceType {
    pub fn as_aws(self) -> &'static str {
        match self {
            ResourceType::Vcpu => "VCPU",
            ResourceType::Memory => "MEMORY",
            ResourceType::Gpu => "GPU",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "VCPU" => Some(ResourceType::Vcpu),
            "MEMORY" => Some(ResourceType::Memory),
            "GPU" => Some(ResourceType::Gpu),
            _ => None,
        }
    }
}

/// One `resourceRequirements` entry, kept as the user wrote it (the value is a string on the
/// wire: `"0.5"`, `"2048"`) so that it is echoed back unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRequirement {
    pub resource_type: ResourceType,
    pub value: String,
}

/// The container part of a definition or of a job after overrides.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    pub command: Vec<String>,
    /// `environment` as ordered name/value pairs (AWS echoes them in the order given).
    pub environment: Vec<(String, String)>,
    /// The deprecated top-level `vcpus`, when the user gave it.
    pub vcpus: Option<i64>,
    /// The deprecated top-level `memory` (MiB), when the user gave it.
    pub memory: Option<i64>,
    pub resource_requirements: Vec<ResourceRequirement>,
}

impl ContainerSpec {
    /// The amount the container reserves. `resourceRequirements` win over the deprecated
    /// fields; both forms were validated when the definition or job was accepted.
    pub fn resources(&self) -> Resources {
        let mut r = Resources::new(
            self.vcpus.map_or(0, |v| v.max(0) as u64 * 1000),
            self.memory.map_or(0, |m| m.max(0) as u64),
            0,
        );
        for req in &self.resource_requirements {
            match req.resource_type {
                ResourceType::Vcpu => {
                    r.millicpus = crate::validate::parse_vcpus(&req.value).unwrap_or(0)
                }
                ResourceType::Memory => r.memory_mib = req.value.trim().parse().unwrap_or(0),
                ResourceType::Gpu => r.gpus = req.value.trim().parse().unwrap_or(0),
            }
        }
        r
    }

    /// Applies `containerOverrides`: command and resource requirements replace, environment
    /// entries are merged by name (an override wins).
    pub fn with_overrides(&self, o: &ContainerOverrides) -> ContainerSpec {
        let mut spec = self.clone();
        if let Some(cmd) = &o.command {
            spec.command = cmd.clone();
        }
        for (name, value) in &o.environment {
            match spec.environment.iter_mut().find(|(n, _)| n == name) {
                Some(entry) => entry.1 = value.clone(),
                None => spec.environment.push((name.clone(), value.clone())),
            }
        }
        if let Some(v) = o.vcpus {
            spec.vcpus = Some(v);
        }
        if let Some(m) = o.memory {
            spec.memory = Some(m);
        }
        for req in &o.resource_requirements {
            spec.resource_requirements
                .retain(|r| r.resource_type != req.resource_type);
            spec.resource_requirements.push(req.clone());
        }
        spec.resource_requirements.sort_by_key(|r| r.resource_type);
        spec
    }
}

/// `containerOverrides` on SubmitJob.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerOverrides {
    pub command: Option<Vec<String>>,
    pub environment: Vec<(String, String)>,
    pub vcpus: Option<i64>,
    pub memory: Option<i64>,
    pub resource_requirements: Vec<ResourceRequirement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DefinitionStatus {
    Active,
    Inactive,
}

impl DefinitionStatus {
    pub fn as_aws(self) -> &'static str {
        match self {
            DefinitionStatus::Active => "ACTIVE",
            DefinitionStatus::Inactive => "INACTIVE",
        }
    }
}

/// What RegisterJobDefinition asks for; the revision is assigned when it applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDefinitionSpec {
    pub name: String,
    pub container: ContainerSpec,
    pub parameters: BTreeMap<String, String>,
    pub tags: Tags,
    #[serde(default)]
    pub retry: Option<crate::RetryStrategy>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Other members as sent (`containerProperties` in full, `platformCapabilities`, …).
    #[serde(default)]
    pub extra: super::Extra,
    /// What runs the definition's jobs; Muster runs only `Container` ones.
    #[serde(default)]
    pub orchestration: Orchestration,
    /// The Docker options of `containerProperties` the agent applies.
    #[serde(default)]
    pub options: ContainerOptions,
    /// `schedulingPriority`: jobs' priority within a share identifier unless they override it.
    #[serde(default)]
    pub scheduling_priority: Option<i64>,
    /// `nodeProperties` of a `multinode` definition (`container` is then its main node's).
    #[serde(default)]
    pub node_properties: Option<super::NodeProperties>,
}

/// What a job definition describes: a container (`containerProperties`, which Muster runs),
/// or a Kubernetes pod (`eksProperties`) or ECS task (`ecsProperties`), which are stored and
/// echoed but not run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Orchestration {
    #[default]
    Container,
    Eks,
    Ecs,
}

impl Orchestration {
    /// The member that describes it (`eksProperties`, …).
    pub fn member(self) -> &'static str {
        match self {
            Orchestration::Container => "containerProperties",
            Orchestration::Eks => "eksProperties",
            Orchestration::Ecs => "ecsProperties",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDefinition {
    pub name: String,
    pub revision: u32,
    pub arn: Arn,
    pub status: DefinitionStatus,
    pub container: ContainerSpec,
    pub parameters: BTreeMap<String, String>,
    pub tags: Tags,
    #[serde(default)]
    pub retry: Option<crate::RetryStrategy>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub extra: super::Extra,
    #[serde(default)]
    pub orchestration: Orchestration,
    #[serde(default)]
    pub options: ContainerOptions,
    #[serde(default)]
    pub scheduling_priority: Option<i64>,
    /// `nodeProperties` of a `multinode` definition (`container` is then its main node's).
    #[serde(default)]
    pub node_properties: Option<super::NodeProperties>,
}

impl JobDefinition {
    /// The `awslogs-group` its `containerProperties.logConfiguration` names with the
    /// `awslogs` driver: where its jobs' output is served.
    pub fn awslogs_group(&self) -> Option<&str> {
        let config = self
            .extra
            .get("containerProperties")?
            .get("logConfiguration")?;
        if config.get("logDriver")?.as_str()? != "awslogs" {
            return None;
        }
        config.get("options")?.get("awslogs-group")?.as_str()
    }
}

/// The Docker options of a definition's `containerProperties` that the agent applies as
/// given: volumes and where they are mounted, the user, a read-only root file system and
/// ulimits. Parsed from `containerProperties` when the definition is registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerOptions {
    pub volumes: Vec<Volume>,
    pub mount_points: Vec<MountPoint>,
    pub user: Option<String>,
    pub readonly_root_filesystem: bool,
    pub ulimits: Vec<Ulimit>,
    /// `privileged`.
    #[serde(default)]
    pub privileged: bool,
    /// `linuxParameters.capabilities.add`.
    #[serde(default)]
    pub capabilities_add: Vec<String>,
    /// `linuxParameters.devices`.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// The container shares the worker's network: set for the nodes of multi-node jobs, never
    /// by a definition.
    #[serde(default)]
    pub host_network: bool,
}

/// One `linuxParameters.devices` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub host_path: String,
    pub container_path: Option<String>,
    /// `READ`, `WRITE`, `MKNOD`; all three when none are given.
    pub permissions: Vec<String>,
}

/// Capabilities Docker grants every container already: adding one changes nothing.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Something a job definition asks for that reaches past its container into the worker, with
/// the member that asks for it. Each needs an explicit allowance: of the caller who registers
/// the definition (IAM) and of the agent that runs it (its config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escape {
    Privileged,
    HostPath(String),
    Device(String),
    Capability(String),
}

impl Escape {
    /// The `containerProperties` member that asks for it.
    pub fn field(&self) -> &'static str {
        match self {
            Escape::Privileged => "containerProperties.privileged",
            Escape::HostPath(_) => "containerProperties.volumes.host.sourcePath",
            Escape::Device(_) => "containerProperties.linuxParameters.devices",
            Escape::Capability(_) => "containerProperties.linuxParameters.capabilities.add",
        }
    }
}

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Escape::Privileged => write!(f, "{}: a privileged container", self.field()),
            Escape::HostPath(p) => write!(f, "{}: host path {p}", self.field()),
            Escape::Device(d) => write!(f, "{}: host device {d}", self.field()),
            Escape::Capability(c) => write!(f, "{}: capability {c}", self.field()),
        }
    }
}

impl ContainerOptions {
    /// What in these options reaches past the container.
    pub fn escapes(&self) -> Vec<Escape> {
        let mut out = Vec::new();
        if self.privileged {
            out.push(Escape::Privileged);
        }
        out.extend(
            self.volumes
                .iter()
                .filter_map(|v| v.host_path.clone().map(Escape::HostPath)),
        );
        out.extend(
            self.devices
                .iter()
                .map(|d| Escape::Device(d.host_path.clone())),
        );
        out.extend(
            self.capabilities_add
                .iter()
                .filter(|c| !DEFAULT_CAPABILITIES.contains(&c.trim_start_matches("CAP_")))
                .map(|c| Escape::Capability(c.clone())),
        );
        out
    }
}

/// Whether an agent whose config lists `allowed` may mount host path `path`: it or a folder
/// above it is listed, except that `/` and a container engine's socket must be listed
/// themselves (a listed `/var/run` does not let a job drive the engine).
pub fn host_path_allowed(path: &str, allowed: &[String]) -> bool {
    let path = path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let named_itself = path == "/" || path.ends_with(".sock");
    allowed.iter().any(|a| {
        let a = a.trim_end_matches('/');
        let a = if a.is_empty() { "/" } else { a };
        a == path
            || (!named_itself
                && (a == "/"
                    || path
                        .strip_prefix(a)
                        .is_some_and(|rest| rest.starts_with('/'))))
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// `host.sourcePath`; without one, a Docker volume of that name.
    pub host_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPoint {
    pub source_volume: String,
    pub container_path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    #[test]
    fn a_listed_folder_allows_what_is_below_it_but_never_the_root_or_an_engine_socket() {
        let allowed = vec!["/srv/data".to_owned(), "/var/run".to_owned()];
        assert!(host_path_allowed("/srv/data", &allowed));
        assert!(host_path_allowed("/srv/data/in/", &allowed));
        assert!(!host_path_allowed("/srv/database", &allowed));
        assert!(!host_path_allowed("/", &allowed));
        assert!(!host_path_allowed("/var/run/docker.sock", &allowed));
        assert!(!host_path_allowed("/etc", &[]));
        // Listed themselves, they are allowed; `/` allows all else.
        assert!(host_path_allowed(
            "/var/run/docker.sock",
            &["/var/run/docker.sock".to_owned()]
        ));
        assert!(host_path_allowed("/etc/passwd", &["/".to_owned()]));
        assert!(!host_path_allowed(
            "/run/containerd/containerd.sock",
            &["/".to_owned()]
        ));
    }

    #[test]
    fn what_docker_grants_anyway_is_no_escape() {
        let options = ContainerOptions {
            capabilities_add: vec!["CHOWN".into(), "CAP_KILL".into(), "SYS_ADMIN".into()],
            volumes: vec![Volume {
                name: "scratch".into(),
                host_path: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            options.escapes(),
            vec![Escape::Capability("SYS_ADMIN".into())]
        );
    }
}
