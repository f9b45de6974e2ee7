//! CreateJobQueue, DescribeJobQueues.

use crate::compute_environments::parse_state;
use crate::request::{page_size, parse, required, tags};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{Arn, CeOrder, Command, JobQueue, State, Tags};
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
    if !(0..=1000).contains(&priority) {
        return Err(ApiError::client(format!(
            "priority: {priority} must be between 0 and 1000"
        )));
    }
    if req.scheduling_policy_arn.is_some() {
        return Err(ApiError::client(
            "schedulingPolicyArn: scheduling policies are not supported by Muster yet",
        ));
    }
    if req
        .job_state_time_limit_actions
        .as_ref()
        .is_some_and(|a| !a.is_empty())
    {
        return Err(ApiError::client(
            "jobStateTimeLimitActions: not supported by Muster yet",
        ));
    }
    let order = req
        .compute_environment_order
        .unwrap_or_default()
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
        .collect::<Result<Vec<_>, ApiError>>()?;
    let queue = JobQueue {
        name: name.clone(),
        arn: Arn(String::new()),
        priority,
        state: parse_state("state", req.state.as_deref())?,
        compute_environment_order: order,
        tags: tags("tags", req.tags)?,
        created_at: plane.now(),
    };
    check_and_propose(plane, Command::CreateJobQueue(queue)).await?;
    let arn = plane
        .read(move |s| s.queue(&name).map(|q| (q.name.clone(), q.arn.0.clone())))
        .await
        .map_err(ApiError::server)?
        .ok_or_else(|| ApiError::server("job queue vanished after commit"))?;
    Ok(json!({ "jobQueueName": arn.0, "jobQueueArn": arn.1 }))
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
    compute_environment_order: Vec<CeOrderShape>,
    job_state_time_limit_actions: Vec<Value>,
    tags: Tags,
}

fn detail(state: &State, q: &JobQueue) -> Detail {
    Detail {
        job_queue_name: q.name.clone(),
        job_queue_arn: q.arn.0.clone(),
        state: q.state.as_aws(),
        status: "VALID",
        status_reason: "JobQueue Healthy",
        priority: q.priority,
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
        job_state_time_limit_actions: Vec::new(),
        tags: q.tags.clone(),
    }
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    caller.authorize("batch:DescribeJobQueues", &["*"])?;
    let req: DescribeRequest = parse(body)?;
    let wanted = req.job_queues.unwrap_or_default();
    if wanted.len() > 100 {
        return Err(ApiError::client(
            "jobQueues: at most 100 may be described at once",
        ));
    }
    let limit = page_size(req.max_results, 100)?;
    let after = req.next_token;
    let (page, more) = plane
        .read(move |s| {
            let mut matching = s
                .queues()
                .filter(|q| {
                    wanted.is_empty() || wanted.iter().any(|w| *w == q.name || *w == q.arn.0)
                })
                .filter(|q| after.as_ref().is_none_or(|a| q.name > *a));
            let page: Vec<Detail> = matching
                .by_ref()
                .take(limit)
                .map(|q| detail(s, q))
                .collect();
            (page, matching.next().is_some())
        })
        .await
        .map_err(ApiError::server)?;
    let token = page
        .last()
        .filter(|_| more)
        .map(|last| last.job_queue_name.clone());
    let mut out = json!({ "jobQueues": page });
    if let Some(token) = token {
        out["nextToken"] = json!(token);
    }
    Ok(out)
}
