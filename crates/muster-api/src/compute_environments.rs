//! CreateComputeEnvironment, DescribeComputeEnvironments.

use crate::request::{page_size, parse, required, tags};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{Arn, CeType, Command, ComputeEnvironment, EnabledState, Tags};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRequest {
    compute_environment_name: Option<String>,
    #[serde(rename = "type")]
    ce_type: Option<String>,
    state: Option<String>,
    #[serde(rename = "unmanagedvCpus")]
    unmanaged_vcpus: Option<i64>,
    compute_resources: Option<Value>,
    service_role: Option<String>,
    tags: Option<Tags>,
}

pub(crate) async fn create<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: CreateRequest = parse(body)?;
    let name = required("computeEnvironmentName", &req.compute_environment_name)?.to_owned();
    muster_core::validate::name("computeEnvironmentName", &name)?;
    caller.authorize(
        "batch:CreateComputeEnvironment",
        &[&arn_of(plane, "compute-environment", &name)],
    )?;
    let ce_type = match required("type", &req.ce_type)? {
        "UNMANAGED" => CeType::Unmanaged,
        "MANAGED" => {
            return Err(ApiError::client(
                "type: MANAGED compute environments are not supported by Muster yet; use UNMANAGED and join agents to it",
            ));
        }
        other => {
            return Err(ApiError::client(format!(
                "type: {other} must be one of MANAGED | UNMANAGED"
            )));
        }
    };
    if req.compute_resources.is_some() {
        return Err(ApiError::client(
            "computeResources: only MANAGED compute environments take computeResources",
        ));
    }
    let state = parse_state("state", req.state.as_deref())?;
    if let Some(v) = req.unmanaged_vcpus
        && v < 0
    {
        return Err(ApiError::client(format!(
            "unmanagedvCpus: {v} must not be negative"
        )));
    }
    let ce = ComputeEnvironment {
        name: name.clone(),
        arn: Arn(String::new()),
        uuid: plane.new_id(),
        ce_type,
        state,
        unmanaged_vcpus: req.unmanaged_vcpus,
        service_role: req.service_role,
        tags: tags("tags", req.tags)?,
        created_at: plane.now(),
    };
    check_and_propose(plane, Command::CreateComputeEnvironment(ce)).await?;
    let arn = plane
        .read(move |s| {
            s.compute_environment(&name)
                .map(|ce| (ce.name.clone(), ce.arn.0.clone()))
        })
        .await
        .map_err(ApiError::server)?
        .ok_or_else(|| ApiError::server("compute environment vanished after commit"))?;
    Ok(json!({ "computeEnvironmentName": arn.0, "computeEnvironmentArn": arn.1 }))
}

pub(crate) fn parse_state(field: &str, state: Option<&str>) -> Result<EnabledState, ApiError> {
    match state {
        None => Ok(EnabledState::Enabled),
        Some(s) => EnabledState::parse(s).ok_or_else(|| {
            ApiError::client(format!("{field}: {s} must be one of ENABLED | DISABLED"))
        }),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeRequest {
    compute_environments: Option<Vec<String>>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    compute_environment_name: String,
    compute_environment_arn: String,
    #[serde(rename = "type")]
    ce_type: &'static str,
    state: &'static str,
    status: &'static str,
    status_reason: &'static str,
    #[serde(rename = "unmanagedvCpus", skip_serializing_if = "Option::is_none")]
    unmanaged_vcpus: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_role: Option<String>,
    tags: Tags,
    uuid: String,
    container_orchestration_type: &'static str,
}

fn detail(ce: &ComputeEnvironment) -> Detail {
    Detail {
        compute_environment_name: ce.name.clone(),
        compute_environment_arn: ce.arn.0.clone(),
        ce_type: ce.ce_type.as_aws(),
        state: ce.state.as_aws(),
        status: "VALID",
        status_reason: "ComputeEnvironment Healthy",
        unmanaged_vcpus: ce.unmanaged_vcpus,
        service_role: ce.service_role.clone(),
        tags: ce.tags.clone(),
        uuid: ce.uuid.clone(),
        container_orchestration_type: "ECS",
    }
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    caller.authorize("batch:DescribeComputeEnvironments", &["*"])?;
    let req: DescribeRequest = parse(body)?;
    let wanted = req.compute_environments.unwrap_or_default();
    if wanted.len() > 100 {
        return Err(ApiError::client(
            "computeEnvironments: at most 100 may be described at once",
        ));
    }
    let limit = page_size(req.max_results, 100)?;
    let after = req.next_token;
    let (page, more) = plane
        .read(move |s| {
            let mut matching = s
                .compute_environments()
                .filter(|ce| {
                    wanted.is_empty() || wanted.iter().any(|w| *w == ce.name || *w == ce.arn.0)
                })
                .filter(|ce| after.as_ref().is_none_or(|a| ce.name > *a));
            let page: Vec<Detail> = matching.by_ref().take(limit).map(detail).collect();
            (page, matching.next().is_some())
        })
        .await
        .map_err(ApiError::server)?;
    let token = page
        .last()
        .filter(|_| more)
        .map(|last| last.compute_environment_name.clone());
    let mut out = json!({ "computeEnvironments": page });
    if let Some(token) = token {
        out["nextToken"] = json!(token);
    }
    Ok(out)
}
