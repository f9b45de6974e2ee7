//! SubmitJob, DescribeJobs, ListJobs, TerminateJob.

use crate::job_definitions::{ContainerShape, container_shape};
use crate::request::{
    KeyValuePair, ResourceRequirementShape, environment, page_size, parse, required,
    resource_requirements, tags,
};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{
    ArrayRole, Command, ContainerOverrides, Job, JobId, JobStatus, JobSubmission, MultiNodeRole,
    NodeOverride, NodeOverrides, Outcome, State, Tags, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ContainerOverridesShape {
    command: Option<Vec<String>>,
    environment: Option<Vec<KeyValuePair>>,
    resource_requirements: Option<Vec<ResourceRequirementShape>>,
    vcpus: Option<i64>,
    memory: Option<i64>,
    instance_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubmitRequest {
    job_name: Option<String>,
    job_queue: Option<String>,
    job_definition: Option<String>,
    container_overrides: Option<ContainerOverridesShape>,
    parameters: Option<BTreeMap<String, String>>,
    tags: Option<Tags>,
    array_properties: Option<Value>,
    depends_on: Option<Vec<Value>>,
    node_overrides: Option<Value>,
    retry_strategy: Option<Value>,
    timeout: Option<Value>,
    share_identifier: Option<String>,
    scheduling_priority_override: Option<i64>,
}

/// `containerOverrides` at `field`; `instanceType` only where a multi-node job's node range is
/// overridden (Muster has no instance types: it is accepted there and not acted on).
fn overrides(
    field: &str,
    o: ContainerOverridesShape,
    multinode: bool,
) -> Result<ContainerOverrides, ApiError> {
    if let Some(v) = o.vcpus
        && v < 1
    {
        return Err(ApiError::client(format!(
            "{field}.vcpus: {v} must be at least 1"
        )));
    }
    if let Some(m) = o.memory
        && m < 4
    {
        return Err(ApiError::client(format!(
            "{field}.memory: {m} must be at least 4 (MiB)"
        )));
    }
    if o.instance_type.is_some() && !multinode {
        return Err(ApiError::client(format!(
            "{field}.instanceType: only applies to multinode jobs"
        )));
    }
    Ok(ContainerOverrides {
        command: o.command,
        environment: environment(
            &format!("{field}.environment"),
            &o.environment.unwrap_or_default(),
        )?,
        vcpus: o.vcpus,
        memory: o.memory,
        resource_requirements: resource_requirements(
            &format!("{field}.resourceRequirements"),
            &o.resource_requirements.unwrap_or_default(),
        )?,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeOverridesShape {
    num_nodes: Option<i64>,
    node_property_overrides: Option<Vec<NodePropertyOverrideShape>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodePropertyOverrideShape {
    target_nodes: Option<String>,
    container_overrides: Option<ContainerOverridesShape>,
}

/// SubmitJob's `nodeOverrides`: the node count and per-range container changes.
fn node_overrides(raw: &Value) -> Result<NodeOverrides, ApiError> {
    const FIELD: &str = "nodeOverrides";
    let shape: NodeOverridesShape = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::client(format!("{FIELD}: {e}")))?;
    let num_nodes = match shape.num_nodes {
        None => None,
        Some(n) => Some(
            u32::try_from(n)
                .ok()
                .filter(|n| (1..=muster_core::MAX_NODES).contains(n))
                .ok_or_else(|| {
                    ApiError::client(format!(
                        "{FIELD}.numNodes: {n} must be between 1 and {}",
                        muster_core::MAX_NODES
                    ))
                })?,
        ),
    };
    let ranges = shape
        .node_property_overrides
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let field = format!("{FIELD}.nodePropertyOverrides");
            Ok(NodeOverride {
                target_nodes: o
                    .target_nodes
                    .ok_or_else(|| ApiError::client(format!("{field}.targetNodes is required")))?,
                container_overrides: overrides(
                    &format!("{field}.containerOverrides"),
                    o.container_overrides.unwrap_or_default(),
                    true,
                )?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(NodeOverrides { num_nodes, ranges })
}

pub(crate) async fn submit<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: SubmitRequest = parse(body)?;
    let name = required("jobName", &req.job_name)?.to_owned();
    muster_core::validate::name("jobName", &name)?;
    let queue = required("jobQueue", &req.job_queue)?.to_owned();
    let definition = required("jobDefinition", &req.job_definition)?.to_owned();
    let limits = plane.limits();
    let retry = crate::semantics::retry_strategy("retryStrategy", &req.retry_strategy)?;
    let timeout_secs =
        crate::semantics::timeout("timeout", &req.timeout, limits.min_attempt_duration_secs)?;
    let array_size = crate::semantics::array_size(&req.array_properties)?;
    let depends_on = crate::semantics::depends_on(&req.depends_on, limits.max_depends_on)?;
    if let Some(p) = req.scheduling_priority_override
        && !(0..=9999).contains(&p)
    {
        return Err(ApiError::client(format!(
            "schedulingPriorityOverride: {p} must be between 0 and 9999"
        )));
    }
    let fair_share =
        plane.read_local(|s| s.queue(&queue).map(|q| q.scheduling_policy_arn.is_some()));
    match (fair_share, &req.share_identifier) {
        (Some(true), None) => {
            return Err(ApiError::client(
                "shareIdentifier is required on a queue with a fair-share scheduling policy",
            ));
        }
        (Some(false), Some(_)) => {
            return Err(ApiError::client(
                "shareIdentifier: only queues with a fair-share scheduling policy take one",
            ));
        }
        _ => {}
    }
    // SubmitJob needs both the queue and the job definition allowed (as AWS Batch does).
    let (queue_arn, definition_arn) = plane.read_local(|s| {
        (
            s.queue(&queue).map_or_else(
                || s.arn_scope().arn("job-queue", &queue).0,
                |q| q.arn.0.clone(),
            ),
            s.definition(&definition).map_or_else(
                || {
                    s.arn_scope()
                        .arn(
                            "job-definition",
                            definition.rsplit('/').next().unwrap_or(&definition),
                        )
                        .0
                },
                |d| d.arn.0.clone(),
            ),
        )
    });
    caller.authorize("batch:SubmitJob", &[&queue_arn, &definition_arn])?;
    let multinode_definition = plane.read_local(|s| {
        s.definition(&definition)
            .is_some_and(|d| d.node_properties.is_some())
    });
    if req.node_overrides.is_some() || multinode_definition {
        crate::require_level(
            plane,
            muster_core::LEVEL_MULTINODE,
            "jobDefinition",
            "multi-node jobs",
        )?;
    }
    let submission = JobSubmission {
        id: JobId::from(plane.new_id()),
        at: plane.now(),
        name,
        queue,
        definition,
        overrides: overrides(
            "containerOverrides",
            req.container_overrides.unwrap_or_default(),
            false,
        )?,
        node_overrides: req
            .node_overrides
            .as_ref()
            .map(node_overrides)
            .transpose()?,
        parameters: req.parameters.unwrap_or_default(),
        tags: tags("tags", req.tags)?,
        retry,
        timeout_secs,
        depends_on,
        array_size,
        share_identifier: req.share_identifier,
        scheduling_priority_override: req.scheduling_priority_override,
        extra: crate::request::extra(
            body,
            &[
                "jobName",
                "jobQueue",
                "jobDefinition",
                "containerOverrides",
                "parameters",
                "tags",
                "arrayProperties",
                "dependsOn",
                "shareIdentifier",
                "schedulingPriorityOverride",
                "nodeOverrides",
            ],
        ),
    };
    match check_and_propose(plane, Command::SubmitJob(submission)).await? {
        Outcome::JobSubmitted { id, arn, name } => {
            Ok(json!({ "jobArn": arn, "jobName": name, "jobId": id.0 }))
        }
        other => Err(ApiError::server(format!("unexpected outcome {other:?}"))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerDetail {
    #[serde(flatten)]
    spec: ContainerShape,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_stream_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_instance_arn: Option<String>,
    /// The definition's `logConfiguration`, as AWS echoes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    log_configuration: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptContainer {
    container_instance_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    log_stream_name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttemptDetail {
    container: AttemptContainer,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<u64>,
    stopped_at: u64,
    status_reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobDetail {
    job_arn: String,
    job_name: String,
    job_id: String,
    job_queue: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    share_identifier: Option<String>,
    /// The priority fair share orders the job by within its share identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduling_priority: Option<i64>,
    attempts: Vec<AttemptDetail>,
    created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped_at: Option<u64>,
    depends_on: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    array_properties: Option<Value>,
    retry_strategy: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Value>,
    job_definition: String,
    parameters: BTreeMap<String, String>,
    /// Absent on a multi-node job's parent, as AWS shows it: its nodes run the containers.
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerDetail>,
    /// A multi-node job's parent: its node ranges as it runs them (after `nodeOverrides`).
    #[serde(skip_serializing_if = "Option::is_none")]
    node_properties: Option<Value>,
    /// A node of a multi-node job: its index and whether it is the main node.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_details: Option<Value>,
    tags: Tags,
    platform_capabilities: Vec<&'static str>,
    is_terminated: bool,
    is_cancelled: bool,
}

fn depends_on_shape(job: &Job) -> Vec<Value> {
    job.reported_depends_on()
        .iter()
        .map(|d| {
            let mut v = json!({});
            if let Some(id) = &d.job {
                v["jobId"] = json!(id.0);
            }
            if let Some(t) = d.kind.as_aws() {
                v["type"] = json!(t);
            }
            v
        })
        .collect()
}

fn retry_shape(r: &muster_core::RetryStrategy) -> Value {
    let rules: Vec<Value> = r
        .evaluate_on_exit
        .iter()
        .map(|rule| {
            // AWS echoes the action in lower case, whatever case it was given in.
            let mut v = json!({"action": if rule.action == muster_core::RetryAction::Retry { "retry" } else { "exit" }});
            for (key, value) in [("onStatusReason", &rule.on_status_reason), ("onReason", &rule.on_reason), ("onExitCode", &rule.on_exit_code)] {
                if let Some(p) = value {
                    v[key] = json!(p);
                }
            }
            v
        })
        .collect();
    json!({"attempts": r.attempts, "evaluateOnExit": rules})
}

/// `arrayProperties`: the parent's size and per-status counts of its children; a child's
/// index.
fn array_shape(state: &State, job: &Job) -> Option<Value> {
    match job.array.as_ref()? {
        ArrayRole::Parent { size, .. } => {
            let mut summary: BTreeMap<&str, u32> =
                JobStatus::ALL.iter().map(|s| (s.as_aws(), 0)).collect();
            for (status, count) in state.array_status_counts(job) {
                summary.insert(status.as_aws(), count);
            }
            Some(json!({"size": size, "statusSummary": summary}))
        }
        ArrayRole::Child { index, size, .. } => Some(json!({"index": index, "size": size})),
    }
}

/// `nodeProperties` as AWS describes it.
fn node_properties_shape(nodes: &muster_core::NodeProperties) -> Value {
    let ranges: Vec<Value> = nodes
        .ranges
        .iter()
        .map(|r| {
            let mut container =
                serde_json::to_value(container_shape(&r.container)).unwrap_or_else(|_| json!({}));
            crate::request::add_container_lists(&mut container);
            json!({"targetNodes": r.target_nodes, "container": container})
        })
        .collect();
    json!({
        "numNodes": nodes.num_nodes,
        "mainNode": nodes.main_node,
        "nodeRangeProperties": ranges,
    })
}

fn ms(t: Timestamp) -> u64 {
    t.as_millis()
}

fn job_detail(state: &State, job: &Job) -> JobDetail {
    let last = job.attempts.last();
    let queue_arn = state
        .queue(&job.spec.queue)
        .map_or_else(|| job.spec.queue.clone(), |q| q.arn.0.clone());
    let stream = job
        .active
        .as_ref()
        .map(|a| job.log_stream_name(a.number))
        .or_else(|| last.map(|a| a.log_stream_name.clone()));
    let node = job
        .active
        .as_ref()
        .map(|a| a.node.0.clone())
        .or_else(|| last.map(|a| a.node.0.clone()));
    JobDetail {
        job_arn: job.arn(state.arn_scope()).0,
        job_name: job.spec.name.clone(),
        job_id: job.id.to_string(),
        job_queue: queue_arn,
        status: job.status.as_aws(),
        status_reason: job.status_reason.clone(),
        share_identifier: job.spec.share_identifier.clone(),
        scheduling_priority: job
            .spec
            .share_identifier
            .as_ref()
            .map(|_| job.spec.scheduling_priority),
        attempts: job
            .attempts
            .iter()
            .map(|a| AttemptDetail {
                container: AttemptContainer {
                    container_instance_arn: a.node.0.clone(),
                    exit_code: a.exit_code,
                    reason: a.reason.clone(),
                    log_stream_name: a.log_stream_name.clone(),
                },
                started_at: a.started_at.map(ms),
                stopped_at: ms(a.stopped_at),
                status_reason: a.status_reason.clone(),
            })
            .collect(),
        created_at: ms(job.created_at),
        started_at: job.started_at.map(ms),
        stopped_at: job.stopped_at.map(ms),
        depends_on: depends_on_shape(job),
        array_properties: array_shape(state, job),
        retry_strategy: retry_shape(&job.spec.retry),
        timeout: job
            .spec
            .timeout_secs
            .map(|t| json!({"attemptDurationSeconds": t})),
        job_definition: job.spec.definition_arn.0.clone(),
        parameters: job.spec.parameters.clone(),
        node_properties: job
            .gang_size()
            .and(job.spec.node_properties.as_deref())
            .map(node_properties_shape),
        node_details: job
            .gang_node()
            .map(|(_, index, is_main)| json!({"nodeIndex": index, "isMainNode": is_main})),
        container: job.gang_size().is_none().then(|| ContainerDetail {
            spec: container_shape(&job.spec.container),
            exit_code: job
                .active
                .as_ref()
                .map_or_else(|| last.and_then(|a| a.exit_code), |_| None),
            reason: job
                .active
                .as_ref()
                .map_or_else(|| last.and_then(|a| a.reason.clone()), |_| None),
            log_stream_name: stream,
            container_instance_arn: node,
            log_configuration: crate::logs::log_configuration(state, job).cloned(),
        }),
        tags: job.reported_tags().clone(),
        platform_capabilities: vec!["EC2"],
        is_terminated: job.is_terminated,
        is_cancelled: job.is_cancelled,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeRequest {
    jobs: Option<Vec<String>>,
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    caller.authorize("batch:DescribeJobs", &["*"])?;
    let req: DescribeRequest = parse(body)?;
    let ids = req
        .jobs
        .ok_or_else(|| ApiError::client("jobs is required"))?;
    if ids.len() > 100 {
        return Err(ApiError::client(format!(
            "jobs: at most 100 job ids may be described at once (got {})",
            ids.len()
        )));
    }
    let details = plane
        .read(move |s| {
            // Unknown ids are left out, as AWS does.
            ids.iter()
                .filter_map(|id| s.find_job(&JobId::from(id.clone())))
                .map(|j| {
                    let mut described = crate::request::echo(&j.spec.extra, job_detail(s, &j));
                    crate::request::with_container_lists(&mut described, "container");
                    described
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::from)?;
    Ok(json!({ "jobs": details }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListRequest {
    job_queue: Option<String>,
    array_job_id: Option<String>,
    multi_node_job_id: Option<String>,
    job_status: Option<String>,
    max_results: Option<i64>,
    next_token: Option<String>,
    filters: Option<Vec<Value>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobSummary {
    job_arn: String,
    job_id: String,
    job_name: String,
    created_at: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    array_properties: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_properties: Option<Value>,
    job_definition: String,
}

fn summary(scope: &muster_core::ArnScope, job: &Job) -> JobSummary {
    let array_properties = match &job.array {
        Some(ArrayRole::Parent { size, .. }) => Some(json!({"size": size})),
        Some(ArrayRole::Child { index, size, .. }) => Some(json!({"index": index, "size": size})),
        None => None,
    };
    let container = job
        .attempts
        .last()
        .filter(|_| job.status.is_terminal())
        .map(|a| {
            let mut c = json!({});
            if let Some(code) = a.exit_code {
                c["exitCode"] = json!(code);
            }
            if let Some(reason) = &a.reason {
                c["reason"] = json!(reason);
            }
            c
        });
    JobSummary {
        job_arn: job.arn(scope).0,
        job_id: job.id.to_string(),
        job_name: job.spec.name.clone(),
        created_at: ms(job.created_at),
        status: job.status.as_aws(),
        status_reason: job.status_reason.clone(),
        started_at: job.started_at.map(ms),
        stopped_at: job.stopped_at.map(ms),
        container,
        array_properties,
        node_properties: match job.multinode.as_deref() {
            Some(MultiNodeRole::Parent { num_nodes, .. }) => Some(json!({"numNodes": num_nodes})),
            Some(MultiNodeRole::Node {
                index,
                num_nodes,
                main_node,
            }) => Some(json!({
                "nodeIndex": index,
                "numNodes": num_nodes,
                "isMainNode": index == main_node,
            })),
            None => None,
        },
        job_definition: job.spec.definition_arn.0.clone(),
    }
}

pub(crate) async fn list<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    caller.authorize("batch:ListJobs", &["*"])?;
    let req: ListRequest = parse(body)?;
    let filters = list_filters(req.filters.as_deref().unwrap_or_default())?;
    let given = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
    let source = match (
        given(&req.job_queue),
        given(&req.array_job_id),
        given(&req.multi_node_job_id),
    ) {
        (Some(q), None, None) => Source::Queue(q),
        (None, Some(a), None) => Source::Array(JobId::from(a)),
        (None, None, Some(m)) => Source::MultiNode(JobId::from(m)),
        _ => {
            return Err(ApiError::client(
                "give exactly one of jobQueue, arrayJobId or multiNodeJobId",
            ));
        }
    };
    // Without a status AWS lists RUNNING jobs; with filters it lists every status.
    let status = match (req.job_status.as_deref(), filters.is_empty()) {
        (_, false) => None,
        (None, true) => Some(JobStatus::Running),
        (Some(s), true) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::client(format!(
                "jobStatus: {s} must be one of SUBMITTED | PENDING | RUNNABLE | STARTING | RUNNING | SUCCEEDED | FAILED"
            ))
        })?),
    };
    let limit = page_size(req.max_results, if filters.is_empty() { 1000 } else { 100 })?;
    let after = match req.next_token.as_deref() {
        None => None,
        Some(t) => Some(
            t.split_once('/')
                .and_then(|(seq, id)| Some((seq.parse::<u64>().ok()?, id.to_owned())))
                .ok_or_else(|| ApiError::client("nextToken: not a token this API returned"))?,
        ),
    };
    let result = plane
        .read(move |s| {
            let after = after.map(|(seq, id)| (seq, JobId::from(id)));
            let listed: Box<dyn Iterator<Item = Cow<'_, Job>>> = match &source {
                Source::Queue(queue) => {
                    let q = s.queue(queue)?;
                    // Array children and the nodes of multi-node jobs are listed through
                    // their parent (arrayJobId, multiNodeJobId). Ended jobs come from the
                    // archive, merged in submit order.
                    s.listed_jobs(&q.name, status, after.clone())
                }
                Source::Array(parent) => {
                    s.find_job(parent)?;
                    Box::new(
                        s.family_of(parent)
                            .into_iter()
                            .filter(|j| matches!(j.array, Some(ArrayRole::Child { .. }))),
                    )
                }
                Source::MultiNode(parent) => {
                    s.find_job(parent)?.gang_size()?;
                    Box::new(
                        s.family_of(parent)
                            .into_iter()
                            .filter(|j| j.gang_node().is_some()),
                    )
                }
            };
            let mut matching = listed
                .filter(|j| status.is_none_or(|st| j.status == st))
                .filter(|j| filters.iter().all(|f| f.matches(j)))
                .filter(|j| {
                    after
                        .as_ref()
                        .is_none_or(|(seq, id)| (j.seq, &j.id) > (*seq, id))
                });
            let page: Vec<(JobSummary, String)> = matching
                .by_ref()
                .take(limit)
                .map(|j| (summary(s.arn_scope(), &j), format!("{}/{}", j.seq, j.id.0)))
                .collect();
            Some((page, matching.next().is_some()))
        })
        .await
        .map_err(ApiError::from)?;
    let Some((page, more)) = result else {
        return Err(match (req.array_job_id, req.multi_node_job_id) {
            (Some(a), _) => ApiError::client(format!("arrayJobId: array job {a} does not exist")),
            (_, Some(m)) => {
                ApiError::client(format!("multiNodeJobId: multi-node job {m} does not exist"))
            }
            _ => ApiError::client(format!(
                "jobQueue: job queue {} does not exist",
                req.job_queue.unwrap_or_default()
            )),
        });
    };
    let token = page.last().filter(|_| more).map(|(_, t)| t.clone());
    let summaries: Vec<JobSummary> = page.into_iter().map(|(s, _)| s).collect();
    Ok(crate::request::page_answer(
        "jobSummaryList",
        summaries,
        token,
    ))
}

enum Source {
    Queue(String),
    Array(JobId),
    MultiNode(JobId),
}

/// One ListJobs filter.
enum Filter {
    /// `JOB_NAME`: exact, or a prefix when the value ends in `*`.
    Name(String),
    /// `JOB_DEFINITION`: name, `name:revision` or ARN, prefix with `*`.
    Definition(String),
    BeforeCreatedAt(u64),
    AfterCreatedAt(u64),
}

impl Filter {
    fn matches(&self, job: &Job) -> bool {
        match self {
            Filter::Name(p) => muster_core::glob(p, &job.spec.name),
            Filter::Definition(p) => {
                let arn = &job.spec.definition_arn.0;
                let short = arn.rsplit('/').next().unwrap_or(arn);
                let name = short.split(':').next().unwrap_or(short);
                [arn.as_str(), short, name]
                    .iter()
                    .any(|c| muster_core::glob(p, c))
            }
            Filter::BeforeCreatedAt(t) => job.created_at.as_millis() < *t,
            Filter::AfterCreatedAt(t) => job.created_at.as_millis() > *t,
        }
    }
}

fn list_filters(raw: &[Value]) -> Result<Vec<Filter>, ApiError> {
    raw.iter()
        .map(|f| {
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = f.get("values").and_then(Value::as_array).map_or_else(Vec::new, |v| {
                v.iter().filter_map(Value::as_str).collect()
            });
            let [value] = values[..] else {
                return Err(ApiError::client(format!("filters.values: {name} takes exactly one value")));
            };
            let time = || {
                value.parse::<u64>().map_err(|_| ApiError::client(format!("filters.values: {name} needs epoch milliseconds")))
            };
            Ok(match name {
                "JOB_NAME" => Filter::Name(value.to_owned()),
                "JOB_DEFINITION" => Filter::Definition(value.to_owned()),
                "BEFORE_CREATED_AT" => Filter::BeforeCreatedAt(time()?),
                "AFTER_CREATED_AT" => Filter::AfterCreatedAt(time()?),
                other => {
                    return Err(ApiError::client(format!(
                        "filters.name: {other} must be one of JOB_NAME | JOB_DEFINITION | BEFORE_CREATED_AT | AFTER_CREATED_AT"
                    )));
                }
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TerminateRequest {
    job_id: Option<String>,
    reason: Option<String>,
}

pub(crate) async fn terminate<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: TerminateRequest = parse(body)?;
    let job = JobId::from(required("jobId", &req.job_id)?.to_owned());
    caller.authorize("batch:TerminateJob", &[&arn_of(plane, "job", &job.0)])?;
    let reason = required("reason", &req.reason)?.to_owned();
    if !job_exists(plane, &job).await? {
        return Ok(json!({}));
    }
    check_and_propose(
        plane,
        Command::TerminateJob {
            job,
            reason,
            at: plane.now(),
        },
    )
    .await?;
    Ok(json!({}))
}

/// Whether `job` exists: this node's replica first, and a linearizable read where it has not
/// heard of it (it may lag). CancelJob and TerminateJob of a job that does not exist answer
/// `{}` as AWS does (clients terminate defensively) and write nothing.
async fn job_exists<P: ControlPlane>(plane: &P, job: &JobId) -> Result<bool, ApiError> {
    if plane.read_local(|state| state.job_exists(job)) {
        return Ok(true);
    }
    let job = job.clone();
    plane
        .read(move |state| state.job_exists(&job))
        .await
        .map_err(ApiError::from)
}

/// CancelJob: fails a job that has not reached STARTING (and says nothing about one that
/// has, as AWS does); idempotent.
pub(crate) async fn cancel<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: TerminateRequest = parse(body)?;
    let job = JobId::from(required("jobId", &req.job_id)?.to_owned());
    let reason = required("reason", &req.reason)?.to_owned();
    caller.authorize("batch:CancelJob", &[&arn_of(plane, "job", &job.0)])?;
    if !job_exists(plane, &job).await? {
        return Ok(json!({}));
    }
    let cmd = muster_core::AdminCommand::CancelJob {
        job,
        reason,
        at: plane.now(),
    };
    check_and_propose(plane, Command::Admin(cmd)).await?;
    Ok(json!({}))
}
