//! CreateJobQueue, UpdateJobQueue, DeleteJobQueue, DescribeJobQueues, GetJobQueueSnapshot.

use crate::compute_environments::parse_state;
use crate::request::{echo, extra, parse, required, tags};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{AdminCommand, Arn, CeOrder, Command, JobQueue, State, Tags, TimeLimitAction};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Deserialize, Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct CeOrderShape {
    order: Option<i64>,
    compute_environment: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRequest {
    job_queue_name: Option<String>,
    priority: Option<i64>,
    state: Option<String>,
    scheduling_policy_arn: Option<String>,
    compute_environment_order: Option<Vec<CeOrderShape>>,
    job_state_time_limit_actions: Option<Vec<Value>>,
    tags: Option<Tags>,
}

/// Members typed here; the rest of a create or update request is stored as sent.
const TYPED: [&str; 8] = [
    "jobQueueName",
    "jobStateTimeLimitActions",
    "jobQueue",
    "priority",
    "state",
    "schedulingPolicyArn",
    "computeEnvironmentOrder",
    "tags",
];

fn check_priority(priority: i64) -> Result<(), ApiError> {
    if (0..=1000).contains(&priority) {
        Ok(())
    } else {
        Err(ApiError::client(format!(
            "priority: {priority} must be between 0 and 1000"
        )))
    }
}

fn ce_order(shapes: Vec<CeOrderShape>) -> Result<Vec<CeOrder>, ApiError> {
    shapes
        .into_iter()
        .map(|o| {
            Ok(CeOrder {
                order: o
                    .order
                    .ok_or_else(|| ApiError::client("computeEnvironmentOrder.order is required"))?,
                compute_environment: o.compute_environment.filter(|c| !c.is_empty()).ok_or_else(
                    || ApiError::client("computeEnvironmentOrder.computeEnvironment is required"),
                )?,
            })
        })
        .collect()
}

/// `jobStateTimeLimitActions`, checked as AWS checks them: at most 5, each for RUNNABLE jobs
/// waiting for a named reason, cancelled after `maxTimeSeconds`.
fn time_limit_actions(actions: &[Value], min_secs: u64) -> Result<Vec<TimeLimitAction>, ApiError> {
    const FIELD: &str = "jobStateTimeLimitActions";
    if actions.len() > 5 {
        return Err(ApiError::client(format!(
            "{FIELD}: at most 5 actions are allowed"
        )));
    }
    actions
        .iter()
        .map(|a| {
            let reason = a
                .get("reason")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| ApiError::client(format!("{FIELD}.reason is required")))?;
            let state = a
                .get("state")
                .and_then(Value::as_str)
                .filter(|s| *s == "RUNNABLE")
                .ok_or_else(|| ApiError::client(format!("{FIELD}.state must be RUNNABLE")))?;
            let max_time_seconds = a
                .get("maxTimeSeconds")
                .and_then(Value::as_u64)
                .filter(|t| (min_secs..=86_400).contains(t))
                .ok_or_else(|| {
                    ApiError::client(format!(
                        "{FIELD}.maxTimeSeconds must be between {min_secs} and 86400"
                    ))
                })?;
            let action = a
                .get("action")
                .and_then(Value::as_str)
                .filter(|a| matches!(*a, "CANCEL" | "TERMINATE"))
                .ok_or_else(|| {
                    ApiError::client(format!("{FIELD}.action must be one of CANCEL | TERMINATE"))
                })?;
            Ok(TimeLimitAction {
                reason: reason.to_owned(),
                state: state.to_owned(),
                max_time_seconds,
                action: action.to_owned(),
            })
        })
        .collect()
}

pub(crate) async fn create<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: CreateRequest = parse(body)?;
    let name = required("jobQueueName", &req.job_queue_name)?.to_owned();
    muster_core::validate::name("jobQueueName", &name)?;
    caller.authorize(
        "batch:CreateJobQueue",
        &[&arn_of(plane, "job-queue", &name)],
    )?;
    let priority = req
        .priority
        .ok_or_else(|| ApiError::client("priority is required"))?;
    check_priority(priority)?;
    let time_limit_actions = time_limit_actions(
        req.job_state_time_limit_actions
            .as_deref()
            .unwrap_or_default(),
        plane.limits().min_state_time_limit_secs,
    )?;
    if let Some(arn) = &req.scheduling_policy_arn
        && plane.read_local(|s| s.scheduling_policy(arn).is_none())
    {
        return Err(ApiError::client(format!(
            "schedulingPolicyArn: scheduling policy {arn} does not exist"
        )));
    }
    let queue = JobQueue {
        name: name.clone(),
        arn: Arn(String::new()),
        priority,
        state: parse_state("state", req.state.as_deref())?,
        compute_environment_order: ce_order(req.compute_environment_order.unwrap_or_default())?,
        tags: tags("tags", req.tags)?,
        created_at: plane.now(),
        scheduling_policy_arn: req.scheduling_policy_arn,
        time_limit_actions,
        extra: extra(body, &TYPED),
    };
    check_and_propose(plane, Command::CreateJobQueue(queue)).await?;
    let arn = arn_of(plane, "job-queue", &name);
    Ok(json!({ "jobQueueName": name, "jobQueueArn": arn }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateRequest {
    job_queue: Option<String>,
    state: Option<String>,
    scheduling_policy_arn: Option<String>,
    priority: Option<i64>,
    compute_environment_order: Option<Vec<CeOrderShape>>,
    job_state_time_limit_actions: Option<Vec<Value>>,
}

/// Name and ARN of an existing queue named by name or ARN.
fn resolve<P: ControlPlane>(plane: &P, target: &str) -> Result<(String, String), ApiError> {
    plane
        .read_local(|s| s.queue(target).map(|q| (q.name.clone(), q.arn.0.clone())))
        .ok_or_else(|| ApiError::client(format!("jobQueue: job queue {target} does not exist")))
}

pub(crate) async fn update<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: UpdateRequest = parse(body)?;
    let target = required("jobQueue", &req.job_queue)?.to_owned();
    let (name, arn) = resolve(plane, &target)?;
    caller.authorize("batch:UpdateJobQueue", &[&arn])?;
    if let Some(p) = req.priority {
        check_priority(p)?;
    }
    let time_limit_actions = req
        .job_state_time_limit_actions
        .as_deref()
        .map(|a| time_limit_actions(a, plane.limits().min_state_time_limit_secs))
        .transpose()?;
    let cmd = AdminCommand::UpdateJobQueue {
        job_queue: target,
        state: req
            .state
            .as_deref()
            .map(|s| parse_state("state", Some(s)))
            .transpose()?,
        priority: req.priority,
        compute_environment_order: req.compute_environment_order.map(ce_order).transpose()?,
        scheduling_policy_arn: req.scheduling_policy_arn,
        time_limit_actions,
        extra: extra(body, &TYPED),
    };
    check_and_propose(plane, Command::Admin(cmd)).await?;
    Ok(json!({ "jobQueueName": name, "jobQueueArn": arn }))
}

pub(crate) async fn delete<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    crate::delete_one(
        plane,
        caller,
        body,
        ("jobQueue", "batch:DeleteJobQueue"),
        |target| Ok(resolve(plane, target)?.1),
        |job_queue| AdminCommand::DeleteJobQueue {
            job_queue,
            at: plane.now(),
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeRequest {
    job_queues: Option<Vec<String>>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    job_queue_name: String,
    job_queue_arn: String,
    state: &'static str,
    status: &'static str,
    status_reason: &'static str,
    priority: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduling_policy_arn: Option<String>,
    compute_environment_order: Vec<CeOrderShape>,
    job_state_time_limit_actions: Vec<Value>,
    tags: Tags,
}

fn detail(state: &State, q: &JobQueue) -> Value {
    let shape = Detail {
        job_queue_name: q.name.clone(),
        job_queue_arn: q.arn.0.clone(),
        state: q.state.as_aws(),
        status: "VALID",
        status_reason: "JobQueue Healthy",
        priority: q.priority,
        scheduling_policy_arn: q.scheduling_policy_arn.clone(),
        compute_environment_order: q
            .compute_environment_order
            .iter()
            .map(|o| CeOrderShape {
                order: Some(o.order),
                compute_environment: Some(
                    state
                        .compute_environment(&o.compute_environment)
                        .map_or_else(|| o.compute_environment.clone(), |ce| ce.arn.0.clone()),
                ),
            })
            .collect(),
        job_state_time_limit_actions: q
            .time_limit_actions
            .iter()
            .map(|a| {
                json!({
                    "reason": a.reason,
                    "state": a.state,
                    "maxTimeSeconds": a.max_time_seconds,
                    "action": a.action,
                })
            })
            .collect(),
        tags: q.tags.clone(),
    };
    echo(&q.extra, shape)
}

impl crate::request::Named for JobQueue {
    const FIELD: &'static str = "jobQueues";
    const DESCRIBE_ACTION: &'static str = "batch:DescribeJobQueues";
    fn all(state: &State) -> impl Iterator<Item = &Self> {
        state.queues()
    }
    fn name_and_arn(&self) -> (&str, &str) {
        (&self.name, &self.arn.0)
    }
    fn show(&self, state: &State) -> Value {
        detail(state, self)
    }
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    crate::request::describe_named::<JobQueue, DescribeRequest, _>(plane, caller, body, |r| {
        (r.job_queues, r.max_results, r.next_token)
    })
    .await
}

/// The front of the queue: the RUNNABLE jobs in the order they will be considered.
pub(crate) async fn snapshot<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct SnapshotRequest {
        job_queue: Option<String>,
    }
    let req: SnapshotRequest = parse(body)?;
    let target = required("jobQueue", &req.job_queue)?.to_owned();
    let (name, arn) = resolve(plane, &target)?;
    caller.authorize("batch:GetJobQueueSnapshot", &[&arn])?;
    let now = plane.now().as_millis();
    let jobs = plane
        .read(move |s| {
            s.runnable_jobs(&name)
                .take(100)
                .map(|j| json!({"jobArn": j.arn(s.arn_scope()).0, "earliestTimeAtPosition": j.created_at.as_millis()}))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::from)?;
    Ok(json!({"frontOfQueue": {"jobs": jobs, "lastUpdatedAt": now}}))
}
