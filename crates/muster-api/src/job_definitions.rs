//! RegisterJobDefinition, DescribeJobDefinitions.

use crate::request::{
    KeyValuePair, ResourceRequirementShape, environment, page_size, parse, required,
    requirement_shapes, resource_requirements, tags,
};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{
    Command, ContainerOptions, ContainerSpec, DefinitionStatus, Device, JobDefinition,
    JobDefinitionSpec, MountPoint, NodeProperties, NodeRange, Orchestration, Outcome, Tags, Ulimit,
    Volume,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerPropertiesShape {
    image: Option<String>,
    vcpus: Option<i64>,
    memory: Option<i64>,
    command: Option<Vec<String>>,
    environment: Option<Vec<KeyValuePair>>,
    resource_requirements: Option<Vec<ResourceRequirementShape>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterRequest {
    job_definition_name: Option<String>,
    #[serde(rename = "type")]
    definition_type: Option<String>,
    parameters: Option<BTreeMap<String, String>>,
    container_properties: Option<ContainerPropertiesShape>,
    node_properties: Option<Value>,
    eks_properties: Option<Value>,
    ecs_properties: Option<Value>,
    retry_strategy: Option<Value>,
    timeout: Option<Value>,
    tags: Option<Tags>,
}

/// Reads `nodeProperties`: `numNodes`, `mainNode` and the node ranges with each one's
/// container (and its Docker options), checked as AWS checks them (every node in exactly one
/// range). `field` is where it sits in the request.
pub(crate) fn node_properties(field: &str, nodes: &Value) -> Result<NodeProperties, ApiError> {
    let number = |key: &str| -> Result<u32, ApiError> {
        nodes
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::client(format!("{field}.{key} is required (an integer)")))
    };
    let num_nodes = number("numNodes")?;
    let main_node = number("mainNode")?;
    let ranges_field = format!("{field}.nodeRangeProperties");
    let listed = nodes
        .get("nodeRangeProperties")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::client(format!("{ranges_field} is required")))?;
    let mut ranges = Vec::with_capacity(listed.len());
    for range in listed {
        let target_nodes = range
            .get("targetNodes")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::client(format!("{ranges_field}.targetNodes is required")))?
            .to_owned();
        let container_field = format!("{ranges_field}.container");
        let raw = range
            .get("container")
            .cloned()
            .ok_or_else(|| ApiError::client(format!("{container_field} is required")))?;
        let shape: ContainerPropertiesShape = serde_json::from_value(raw.clone())
            .map_err(|e| ApiError::client(format!("{container_field}: {e}")))?;
        check_container_options(&container_field, &raw)?;
        ranges.push(NodeRange {
            target_nodes,
            container: container_spec(&container_field, shape)?,
            options: container_options(&raw),
        });
    }
    let properties = NodeProperties {
        num_nodes,
        main_node,
        ranges,
    };
    properties.check(field)?;
    Ok(properties)
}

fn container_spec(field: &str, c: ContainerPropertiesShape) -> Result<ContainerSpec, ApiError> {
    let image = c
        .image
        .filter(|i| !i.is_empty())
        .ok_or_else(|| ApiError::client(format!("{field}.image is required")))?;
    if let Some(v) = c.vcpus
        && v < 1
    {
        return Err(ApiError::client(format!(
            "{field}.vcpus: {v} must be at least 1"
        )));
    }
    if let Some(m) = c.memory
        && m < 4
    {
        return Err(ApiError::client(format!(
            "{field}.memory: {m} must be at least 4 (MiB)"
        )));
    }
    let spec = ContainerSpec {
        image,
        command: c.command.unwrap_or_default(),
        environment: environment(
            &format!("{field}.environment"),
            &c.environment.unwrap_or_default(),
        )?,
        vcpus: c.vcpus,
        memory: c.memory,
        resource_requirements: resource_requirements(
            &format!("{field}.resourceRequirements"),
            &c.resource_requirements.unwrap_or_default(),
        )?,
    };
    let r = spec.resources();
    if r.millicpus == 0 {
        return Err(ApiError::client(format!(
            "{field}.resourceRequirements: a VCPU requirement (or {field}.vcpus) is required"
        )));
    }
    if r.memory_mib == 0 {
        return Err(ApiError::client(format!(
            "{field}.resourceRequirements: a MEMORY requirement (or {field}.memory) is required"
        )));
    }
    Ok(spec)
}

/// The Docker options of AWS's `containerProperties` members (anything malformed is skipped:
/// [`check_container_options`] refuses it first).
pub(crate) fn container_options(props: &serde_json::Value) -> ContainerOptions {
    let list = |key: &str| {
        props
            .get(key)
            .and_then(serde_json::Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let linux = props.get("linuxParameters");
    ContainerOptions {
        volumes: list("volumes")
            .iter()
            .filter_map(|v| {
                Some(Volume {
                    name: text(v, "name")?,
                    host_path: v.get("host").and_then(|h| text(h, "sourcePath")),
                })
            })
            .collect(),
        mount_points: list("mountPoints")
            .iter()
            .filter_map(|m| {
                Some(MountPoint {
                    source_volume: text(m, "sourceVolume")?,
                    container_path: text(m, "containerPath")?,
                    read_only: m
                        .get("readOnly")
                        .and_then(serde_json::Value::as_bool)
                        .unwrap_or(false),
                })
            })
            .collect(),
        user: text(props, "user"),
        readonly_root_filesystem: props
            .get("readonlyRootFilesystem")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        ulimits: list("ulimits")
            .iter()
            .filter_map(|u| {
                Some(Ulimit {
                    name: text(u, "name")?,
                    soft: u.get("softLimit")?.as_i64()?,
                    hard: u.get("hardLimit")?.as_i64()?,
                })
            })
            .collect(),
        privileged: props
            .get("privileged")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        capabilities_add: linux
            .and_then(|l| l.get("capabilities"))
            .and_then(|c| c.get("add"))
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect(),
        devices: linux
            .and_then(|l| l.get("devices"))
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|d| {
                Some(Device {
                    host_path: text(d, "hostPath")?,
                    container_path: text(d, "containerPath"),
                    permissions: d
                        .get("permissions")
                        .and_then(serde_json::Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect(),
                })
            })
            .collect(),
        host_network: false,
    }
}

/// The Muster action a caller's policy must allow to register a definition whose container
/// reaches into its worker (a privileged container, host paths, devices, added capabilities).
pub const REGISTER_PRIVILEGED_ACTION: &str = "batch:RegisterPrivilegedJobDefinition";

/// Refuses a definition that escapes its container unless the caller's policy allows
/// [`REGISTER_PRIVILEGED_ACTION`] on it. (The agent that runs it checks its own allowance too.)
fn allowed_to_escape<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    name: &str,
    options: &ContainerOptions,
) -> Result<(), ApiError> {
    let Some(first) = options.escapes().into_iter().next() else {
        return Ok(());
    };
    let arn = arn_of(plane, "job-definition", name);
    caller
        .authorize(REGISTER_PRIVILEGED_ACTION, &[&arn])
        .map_err(|_| {
            ApiError::client(format!(
                "{first} reaches outside the container: registering it needs the action \
                 {REGISTER_PRIVILEGED_ACTION}, which the caller's policy does not allow"
            ))
        })
}

/// The Docker options Muster applies (`volumes`, `mountPoints`, `user`,
/// `readonlyRootFilesystem`, `ulimits`) must make sense before they reach an agent.
fn check_container_options(field: &str, props: &Value) -> Result<(), ApiError> {
    let options = container_options(props);
    let listed = |key: &str| props.get(key).and_then(Value::as_array).map_or(0, Vec::len);
    if options.volumes.len() != listed("volumes") {
        return Err(ApiError::client(format!(
            "{field}.volumes: every volume needs a name"
        )));
    }
    for v in &options.volumes {
        if v.host_path
            .as_deref()
            .is_some_and(|p| !p.starts_with('/') || p.split('/').any(|part| part == ".."))
        {
            return Err(ApiError::client(format!(
                "{field}.volumes.host.sourcePath of {}: must be an absolute path without ..",
                v.name
            )));
        }
    }
    if let Some(bad) = props
        .get("linuxParameters")
        .and_then(|l| l.get("devices"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|d| {
            d.get("hostPath")
                .and_then(Value::as_str)
                .is_none_or(|p| !p.starts_with('/'))
        })
    {
        return Err(ApiError::client(format!(
            "{field}.linuxParameters.devices.hostPath: every device needs an absolute host path ({bad})"
        )));
    }
    if options.mount_points.len() != listed("mountPoints") {
        return Err(ApiError::client(format!(
            "{field}.mountPoints: every mount point needs a sourceVolume and a containerPath"
        )));
    }
    for m in &options.mount_points {
        if !options.volumes.iter().any(|v| v.name == m.source_volume) {
            return Err(ApiError::client(format!(
                "{field}.mountPoints.sourceVolume: {} names no volume in {field}.volumes",
                m.source_volume
            )));
        }
        if !m.container_path.starts_with('/') {
            return Err(ApiError::client(format!(
                "{field}.mountPoints.containerPath: {} must be an absolute path",
                m.container_path
            )));
        }
    }
    if options.ulimits.len() != listed("ulimits") {
        return Err(ApiError::client(format!(
            "{field}.ulimits: every ulimit needs a name, softLimit and hardLimit"
        )));
    }
    if let Some(u) = options
        .ulimits
        .iter()
        .find(|u| u.soft > u.hard || u.soft < 0)
    {
        return Err(ApiError::client(format!(
            "{field}.ulimits: {} softLimit must be between 0 and its hardLimit",
            u.name
        )));
    }
    Ok(())
}

/// Which of `containerProperties`, `eksProperties` and `ecsProperties` the definition uses
/// (exactly one, for type container), with AWS's checks of the other two.
fn orchestration(req: &RegisterRequest, multinode: bool) -> Result<Orchestration, ApiError> {
    let given: Vec<Orchestration> = [
        (req.container_properties.is_some(), Orchestration::Container),
        (req.eks_properties.is_some(), Orchestration::Eks),
        (req.ecs_properties.is_some(), Orchestration::Ecs),
    ]
    .into_iter()
    .filter_map(|(set, o)| set.then_some(o))
    .collect();
    if given.len() > 1 {
        return Err(ApiError::client(
            "only one of containerProperties, eksProperties and ecsProperties may be given",
        ));
    }
    let Some(kind) = given.first().copied() else {
        return Ok(Orchestration::Container);
    };
    if multinode && kind != Orchestration::Container {
        return Err(ApiError::client(format!(
            "{}: multinode job definitions take nodeProperties",
            kind.member()
        )));
    }
    let containers_in = |value: &Value, path: &[&str]| -> usize {
        path.iter()
            .try_fold(value, |v, key| v.get(*key))
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    };
    match kind {
        Orchestration::Container => {}
        Orchestration::Eks => {
            let eks = req.eks_properties.as_ref().unwrap_or(&Value::Null);
            if containers_in(eks, &["podProperties", "containers"]) == 0 {
                return Err(ApiError::client(
                    "eksProperties.podProperties.containers must contain at least one container",
                ));
            }
        }
        Orchestration::Ecs => {
            let ecs = req.ecs_properties.as_ref().unwrap_or(&Value::Null);
            let tasks = ecs.get("taskProperties").and_then(Value::as_array);
            if tasks.is_none_or(|t| t.len() != 1) {
                return Err(ApiError::client(
                    "ecsProperties.taskProperties must contain exactly one task",
                ));
            }
            if tasks
                .and_then(|t| t.first())
                .is_none_or(|t| containers_in(t, &["containers"]) == 0)
            {
                return Err(ApiError::client(
                    "ecsProperties.taskProperties[0].containers must contain at least one container",
                ));
            }
        }
    }
    Ok(kind)
}

pub(crate) async fn register<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: RegisterRequest = parse(body)?;
    let name = required("jobDefinitionName", &req.job_definition_name)?.to_owned();
    muster_core::validate::name("jobDefinitionName", &name)?;
    caller.authorize(
        "batch:RegisterJobDefinition",
        &[&arn_of(plane, "job-definition", &name)],
    )?;
    let multinode = match required("type", &req.definition_type)? {
        "container" => false,
        "multinode" => {
            crate::require_level(
                plane,
                muster_core::LEVEL_MULTINODE,
                "type",
                "multinode job definitions",
            )?;
            true
        }
        other => {
            return Err(ApiError::client(format!(
                "type: {other} must be one of container | multinode"
            )));
        }
    };
    let node_properties = match (multinode, &req.node_properties) {
        (false, Some(_)) => {
            return Err(ApiError::client(
                "nodeProperties: only multinode job definitions take nodeProperties",
            ));
        }
        (true, None) => {
            return Err(ApiError::client(
                "nodeProperties is required for type multinode",
            ));
        }
        (true, Some(nodes)) => Some(node_properties("nodeProperties", nodes)?),
        (false, None) => None,
    };
    // A multi-node definition's jobs are described by their main node's container.
    let container_properties = node_properties.as_ref().map(|nodes| {
        nodes
            .range_of(nodes.main_node)
            .map(|r| r.container.clone())
            .unwrap_or_default()
    });
    let retry = crate::semantics::retry_strategy("retryStrategy", &req.retry_strategy)?;
    let timeout_secs = crate::semantics::timeout(
        "timeout",
        &req.timeout,
        plane.limits().min_attempt_duration_secs,
    )?;
    let orchestration = orchestration(&req, multinode)?;
    let container = match (container_properties, orchestration) {
        (Some(main), _) => main,
        // Stored and echoed; SubmitJob refuses them (the state machine says why).
        (None, Orchestration::Eks | Orchestration::Ecs) => ContainerSpec::default(),
        (None, Orchestration::Container) => {
            container_spec("containerProperties", req.container_properties.ok_or_else(|| {
                ApiError::client(
                    "containerProperties is required for type container (or eksProperties, ecsProperties)",
                )
            })?)?
        }
    };
    let mut extra = crate::request::extra(body, &["jobDefinitionName", "parameters", "tags"]);
    let options = match extra.get("containerProperties") {
        Some(props) => {
            check_container_options("containerProperties", props)?;
            container_options(props)
        }
        None => ContainerOptions::default(),
    };
    allowed_to_escape(plane, caller, &name, &options)?;
    for range in node_properties.iter().flat_map(|n| &n.ranges) {
        allowed_to_escape(plane, caller, &name, &range.options)?;
    }
    // Echoed as sent (from `extra`); the state machine acts on the typed copy.
    let scheduling_priority = match extra.get("schedulingPriority") {
        None | Some(Value::Null) => None,
        Some(p) => Some(
            p.as_i64()
                .filter(|p| (0..=9999).contains(p))
                .ok_or_else(|| {
                    ApiError::client(format!(
                        "schedulingPriority: {p} must be an integer between 0 and 9999"
                    ))
                })?,
        ),
    };
    // Taken in any case (`RETRY`, `retry`, `Exit`), echoed as AWS echoes it: lower case.
    if let Some(rules) = extra
        .get_mut("retryStrategy")
        .and_then(|r| r.get_mut("evaluateOnExit"))
        .and_then(Value::as_array_mut)
    {
        for rule in rules {
            if let Some(action) = rule.get_mut("action")
                && let Some(text) = action.as_str()
            {
                *action = Value::String(text.to_ascii_lowercase());
            }
        }
    }
    let spec = JobDefinitionSpec {
        name,
        container,
        parameters: req.parameters.unwrap_or_default(),
        tags: tags("tags", req.tags)?,
        retry,
        timeout_secs,
        extra,
        orchestration,
        options,
        scheduling_priority,
        node_properties,
    };
    match check_and_propose(plane, Command::RegisterJobDefinition(spec)).await? {
        Outcome::DefinitionRegistered {
            name,
            revision,
            arn,
        } => {
            Ok(json!({ "jobDefinitionName": name, "jobDefinitionArn": arn, "revision": revision }))
        }
        other => Err(ApiError::server(format!("unexpected outcome {other:?}"))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerShape {
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<i64>,
    pub command: Vec<String>,
    pub environment: Vec<KeyValuePair>,
    pub resource_requirements: Vec<ResourceRequirementShape>,
}

pub(crate) fn container_shape(c: &ContainerSpec) -> ContainerShape {
    ContainerShape {
        image: c.image.clone(),
        vcpus: c.vcpus,
        memory: c.memory,
        command: c.command.clone(),
        environment: c
            .environment
            .iter()
            .map(|(n, v)| KeyValuePair {
                name: Some(n.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        resource_requirements: requirement_shapes(&c.resource_requirements),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    job_definition_name: String,
    job_definition_arn: String,
    revision: u32,
    status: &'static str,
    #[serde(rename = "type")]
    definition_type: &'static str,
    parameters: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_properties: Option<ContainerShape>,
    tags: Tags,
    container_orchestration_type: &'static str,
}

fn detail(d: &JobDefinition) -> Detail {
    Detail {
        job_definition_name: d.name.clone(),
        job_definition_arn: d.arn.0.clone(),
        revision: d.revision,
        status: d.status.as_aws(),
        // Multinode definitions an earlier release stored untyped say so in `extra`.
        definition_type: if d.node_properties.is_some()
            || d.extra.get("type").and_then(Value::as_str) == Some("multinode")
        {
            "multinode"
        } else {
            "container"
        },
        parameters: d.parameters.clone(),
        container_properties: (d.orchestration == Orchestration::Container
            && d.node_properties.is_none()
            && !d.extra.contains_key("nodeProperties"))
        .then(|| container_shape(&d.container)),
        tags: d.tags.clone(),
        container_orchestration_type: if d.orchestration == Orchestration::Eks {
            "EKS"
        } else {
            "ECS"
        },
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeRequest {
    job_definitions: Option<Vec<String>>,
    max_results: Option<i64>,
    job_definition_name: Option<String>,
    status: Option<String>,
    next_token: Option<String>,
}

/// The definition name `reference` gives without a revision (`name`, or an ARN ending in
/// `job-definition/name`), if it gives none.
fn unrevisioned_name(reference: &str) -> Option<&str> {
    let tail = reference
        .rsplit_once("job-definition/")
        .map_or(reference, |(_, tail)| tail);
    (!tail.contains(':')).then_some(tail)
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    caller.authorize("batch:DescribeJobDefinitions", &["*"])?;
    let req: DescribeRequest = parse(body)?;
    let wanted = req.job_definitions.unwrap_or_default();
    if wanted.len() > 100 {
        return Err(ApiError::client(
            "jobDefinitions: at most 100 may be described at once",
        ));
    }
    let status = match req.status.as_deref() {
        None => None,
        Some("ACTIVE") => Some(DefinitionStatus::Active),
        Some("INACTIVE") => Some(DefinitionStatus::Inactive),
        Some(other) => {
            return Err(ApiError::client(format!(
                "status: {other} must be one of ACTIVE | INACTIVE"
            )));
        }
    };
    let limit = page_size(req.max_results, 100)?;
    // Tokens are the ARN of the last definition returned; ARNs sort by name then revision
    // only within a name, so the token is the (name, revision) position instead.
    let after = match req.next_token.as_deref() {
        None => None,
        Some(t) => Some(parse_token(t)?),
    };
    let name = req.job_definition_name;
    let (page, more) = plane
        .read(move |s| {
            let mut matching = s
                .definitions()
                .filter(|d| {
                    wanted.is_empty()
                        || wanted.iter().any(|w| match unrevisioned_name(w) {
                            // A name (or ARN) without a revision names every revision.
                            Some(name) => name == d.name,
                            None => s.definition(w).is_some_and(|x| x.arn == d.arn),
                        })
                })
                .filter(|d| name.as_ref().is_none_or(|n| *n == d.name))
                .filter(|d| status.is_none_or(|st| st == d.status))
                .filter(|d| {
                    after
                        .as_ref()
                        .is_none_or(|(n, r)| (&d.name, d.revision) > (n, *r))
                });
            let page: Vec<Value> = matching
                .by_ref()
                .take(limit)
                .map(|d| {
                    let mut shown = crate::request::echo(&d.extra, detail(d));
                    crate::request::with_container_lists(&mut shown, "containerProperties");
                    if let Some(obj) = shown.as_object_mut() {
                        obj.entry("platformCapabilities")
                            .or_insert_with(|| json!(["EC2"]));
                    }
                    shown
                })
                .collect();
            (page, matching.next().is_some())
        })
        .await
        .map_err(ApiError::from)?;
    let token = page.last().filter(|_| more).map(|d| {
        format!(
            "{}:{}",
            d["jobDefinitionName"].as_str().unwrap_or_default(),
            d["revision"]
        )
    });
    Ok(crate::request::page_answer("jobDefinitions", page, token))
}

fn parse_token(token: &str) -> Result<(String, u32), ApiError> {
    token
        .rsplit_once(':')
        .and_then(|(n, r)| Some((n.to_owned(), r.parse().ok()?)))
        .ok_or_else(|| ApiError::client("nextToken: not a token this API returned"))
}

pub(crate) async fn deregister<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct DeregisterRequest {
        job_definition: Option<String>,
    }
    let req: DeregisterRequest = parse(body)?;
    let target = required("jobDefinition", &req.job_definition)?.to_owned();
    let arn = plane
        .read_local(|s| s.definition(&target).map(|d| d.arn.0.clone()))
        .unwrap_or_else(|| arn_of(plane, "job-definition", &target));
    caller.authorize("batch:DeregisterJobDefinition", &[&arn])?;
    check_and_propose(
        plane,
        Command::Admin(muster_core::AdminCommand::DeregisterJobDefinition {
            job_definition: target,
        }),
    )
    .await?;
    Ok(json!({}))
}
