//! CreateComputeEnvironment, DescribeComputeEnvironments.

use crate::request::{parse, required, tags};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{AdminCommand, Arn, CeType, Command, ComputeEnvironment, EnabledState, Tags};
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
        // Stored with its computeResources; Muster does not provision instances for it yet.
        "MANAGED" => CeType::Managed,
        other => {
            return Err(ApiError::client(format!(
                "type: {other} must be one of MANAGED | UNMANAGED"
            )));
        }
    };
    match (ce_type, &req.compute_resources) {
        (CeType::Unmanaged, Some(_)) => {
            return Err(ApiError::client(
                "computeResources: only MANAGED compute environments take computeResources",
            ));
        }
        (CeType::Managed, None) => {
            return Err(ApiError::client(
                "computeResources is required for a MANAGED compute environment",
            ));
        }
        (CeType::Managed, Some(resources)) => check_compute_resources(resources, true)?,
        (CeType::Unmanaged, None) => {}
    }
    if let Some(strategy) = req
        .tags
        .as_ref()
        .and_then(|t| t.get(muster_core::ALLOCATION_STRATEGY_TAG))
        && !["BEST_FIT", "SPREAD"].contains(&strategy.as_str())
    {
        return Err(ApiError::client(format!(
            "tags.{}: {strategy} must be BEST_FIT or SPREAD",
            muster_core::ALLOCATION_STRATEGY_TAG
        )));
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
        extra: crate::request::extra(
            body,
            &[
                "computeEnvironmentName",
                "type",
                "state",
                "unmanagedvCpus",
                "serviceRole",
                "tags",
            ],
        ),
    };
    check_and_propose(plane, Command::CreateComputeEnvironment(ce)).await?;
    let arn = plane
        .read(move |s| {
            s.compute_environment(&name)
                .map(|ce| (ce.name.clone(), ce.arn.0.clone()))
        })
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::server("compute environment vanished after commit"))?;
    Ok(json!({ "computeEnvironmentName": arn.0, "computeEnvironmentArn": arn.1 }))
}

/// `computeResources` as AWS constrains it: a known `type`, `maxvCpus` (required on
/// create), `minvCpus <= desiredvCpus <= maxvCpus`, a known `allocationStrategy`.
fn check_compute_resources(value: &Value, creating: bool) -> Result<(), ApiError> {
    let Some(obj) = value.as_object() else {
        return Err(ApiError::client("computeResources must be an object"));
    };
    let int = |key: &str| -> Result<Option<i64>, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().filter(|n| *n >= 0).map(Some).ok_or_else(|| {
                ApiError::client(format!(
                    "computeResources.{key} must be a whole number, at least 0"
                ))
            }),
        }
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("EC2" | "SPOT" | "FARGATE" | "FARGATE_SPOT") => {}
        None if !creating => {}
        other => {
            return Err(ApiError::client(format!(
                "computeResources.type: {} must be one of EC2 | SPOT | FARGATE | FARGATE_SPOT",
                other.unwrap_or("(missing)")
            )));
        }
    }
    let (min, desired, max) = (int("minvCpus")?, int("desiredvCpus")?, int("maxvCpus")?);
    if creating && max.is_none() {
        return Err(ApiError::client("computeResources.maxvCpus is required"));
    }
    if let (Some(min), Some(max)) = (min, max)
        && min > max
    {
        return Err(ApiError::client(format!(
            "computeResources.minvCpus: {min} is above maxvCpus {max}"
        )));
    }
    if let (Some(d), Some(max)) = (desired, max)
        && d > max
    {
        return Err(ApiError::client(format!(
            "computeResources.desiredvCpus: {d} is above maxvCpus {max}"
        )));
    }
    if let Some(strategy) = obj.get("allocationStrategy").and_then(Value::as_str) {
        const KNOWN: [&str; 6] = [
            "BEST_FIT",
            "BEST_FIT_PROGRESSIVE",
            "BEST_FIT_PROGRESSIVE_ORDERED",
            "SPOT_CAPACITY_OPTIMIZED",
            "SPOT_PRICE_CAPACITY_OPTIMIZED",
            "SPOT_CAPACITY_OPTIMIZED_PRIORITIZED",
        ];
        if !KNOWN.contains(&strategy) {
            return Err(ApiError::client(format!(
                "computeResources.allocationStrategy: {strategy} must be one of {}",
                KNOWN.join(" | ")
            )));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateRequest {
    compute_environment: Option<String>,
    state: Option<String>,
    #[serde(rename = "unmanagedvCpus")]
    unmanaged_vcpus: Option<i64>,
    compute_resources: Option<Value>,
    service_role: Option<String>,
}

pub(crate) async fn update<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: UpdateRequest = parse(body)?;
    let target = required("computeEnvironment", &req.compute_environment)?.to_owned();
    let (name, arn, ce_type) = resolve(plane, &target)?;
    caller.authorize("batch:UpdateComputeEnvironment", &[&arn])?;
    if let Some(resources) = &req.compute_resources {
        if ce_type == CeType::Unmanaged {
            return Err(ApiError::client(
                "computeResources: only MANAGED compute environments take computeResources",
            ));
        }
        check_compute_resources(resources, false)?;
    }
    if let Some(v) = req.unmanaged_vcpus
        && v < 0
    {
        return Err(ApiError::client(format!(
            "unmanagedvCpus: {v} must not be negative"
        )));
    }
    let state = req
        .state
        .as_deref()
        .map(|s| parse_state("state", Some(s)))
        .transpose()?;
    let extra = crate::request::extra(
        body,
        &[
            "computeEnvironment",
            "state",
            "unmanagedvCpus",
            "serviceRole",
        ],
    );
    let cmd = AdminCommand::UpdateComputeEnvironment {
        compute_environment: target,
        state,
        unmanaged_vcpus: req.unmanaged_vcpus,
        service_role: req.service_role,
        extra,
    };
    check_and_propose(plane, Command::Admin(cmd)).await?;
    Ok(json!({ "computeEnvironmentName": name, "computeEnvironmentArn": arn }))
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
        ("computeEnvironment", "batch:DeleteComputeEnvironment"),
        |target| Ok(resolve(plane, target)?.1),
        |compute_environment| AdminCommand::DeleteComputeEnvironment {
            compute_environment,
        },
    )
    .await
}

/// Name, ARN and type of an existing compute environment named by name or ARN.
fn resolve<P: ControlPlane>(plane: &P, target: &str) -> Result<(String, String, CeType), ApiError> {
    plane
        .read_local(|s| {
            s.compute_environment(target)
                .map(|c| (c.name.clone(), c.arn.0.clone(), c.ce_type))
        })
        .ok_or_else(|| {
            ApiError::client(format!(
                "computeEnvironment: compute environment {target} does not exist"
            ))
        })
}

pub(crate) fn parse_state(field: &str, state: Option<&str>) -> Result<EnabledState, ApiError> {
    match state {
        None => Ok(EnabledState::Enabled),
        Some(s) => EnabledState::parse(s).ok_or_else(|| {
            // AWS's own words, which clients match on.
            ApiError::client(format!("{field} {s} must be one of ENABLED | DISABLED"))
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

impl crate::request::Named for ComputeEnvironment {
    const FIELD: &'static str = "computeEnvironments";
    const DESCRIBE_ACTION: &'static str = "batch:DescribeComputeEnvironments";
    fn all(state: &muster_core::State) -> impl Iterator<Item = &Self> {
        state.compute_environments()
    }
    fn name_and_arn(&self) -> (&str, &str) {
        (&self.name, &self.arn.0)
    }
    fn show(&self, _: &muster_core::State) -> Value {
        crate::request::echo(&self.extra, detail(self))
    }
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    crate::request::describe_named::<ComputeEnvironment, DescribeRequest, _>(
        plane,
        caller,
        body,
        |r| (r.compute_environments, r.max_results, r.next_token),
    )
    .await
}
