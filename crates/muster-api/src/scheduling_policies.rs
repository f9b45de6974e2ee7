//! Create, Update, Delete, Describe and List scheduling policies: the fair-share parameters
//! the planner orders a queue's jobs by.

use crate::request::{page_size, parse, required, tags};
use crate::{ApiError, ControlPlane, Principal, arn_of, check_and_propose};
use muster_core::{AdminCommand, Arn, Command, FairsharePolicy, SchedulingPolicy, ShareWeight};
use serde::Deserialize;
use serde_json::{Value, json};

/// Validates `fairsharePolicy` and fills AWS's defaults, as DescribeSchedulingPolicies shows
/// them.
fn fairshare(value: Option<Value>) -> Result<FairsharePolicy, ApiError> {
    const FIELD: &str = "fairsharePolicy";
    let value = value.unwrap_or_else(|| json!({}));
    let Some(obj) = value.as_object() else {
        return Err(ApiError::client(format!("{FIELD} must be an object")));
    };
    let int = |key: &str, max: u64| -> Result<u64, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
                ApiError::client(format!(
                    "{FIELD}.{key} must be a whole number from 0 to {max}"
                ))
            }),
        }
    };
    let decay = int("shareDecaySeconds", 604_800)?;
    let reservation = int("computeReservation", 99)?;
    let shares = match obj.get("shareDistribution") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => {
            return Err(ApiError::client(format!(
                "{FIELD}.shareDistribution must be a list"
            )));
        }
    };
    if shares.len() > 500 {
        return Err(ApiError::client(format!(
            "{FIELD}.shareDistribution: at most 500 share identifiers"
        )));
    }
    let mut out = Vec::new();
    for share in &shares {
        let id = share
            .get("shareIdentifier")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 255)
            .ok_or_else(|| {
                ApiError::client(format!(
                    "{FIELD}.shareDistribution.shareIdentifier is required (1 to 255 characters)"
                ))
            })?;
        let body = id.strip_suffix('*').unwrap_or(id);
        if !body.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ApiError::client(format!(
                "{FIELD}.shareDistribution.shareIdentifier: {id} must be letters and digits, optionally ending in *"
            )));
        }
        let weight = match share.get("weightFactor") {
            None | Some(Value::Null) => 1.0,
            Some(w) => w
                .as_f64()
                .filter(|w| (0.0001..=999.9999).contains(w))
                .ok_or_else(|| {
                    ApiError::client(format!(
                        "{FIELD}.shareDistribution.weightFactor must be between 0.0001 and 999.9999"
                    ))
                })?,
        };
        out.push(ShareWeight {
            share_identifier: id.to_owned(),
            weight_factor: weight,
        });
    }
    Ok(FairsharePolicy {
        share_decay_seconds: decay,
        compute_reservation: reservation,
        share_distribution: out,
    })
}

fn shape(p: &SchedulingPolicy) -> Value {
    json!({"name": p.name, "arn": p.arn.0, "fairsharePolicy": p.fairshare, "tags": p.tags})
}

pub(crate) async fn create<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct CreateRequest {
        name: Option<String>,
        fairshare_policy: Option<Value>,
        tags: Option<muster_core::Tags>,
    }
    let req: CreateRequest = parse(body)?;
    let name = required("name", &req.name)?.to_owned();
    muster_core::validate::name("name", &name)?;
    let arn = arn_of(plane, "scheduling-policy", &name);
    caller.authorize("batch:CreateSchedulingPolicy", &[&arn])?;
    let policy = SchedulingPolicy {
        name: name.clone(),
        arn: Arn(String::new()),
        fairshare: Some(fairshare(req.fairshare_policy)?),
        tags: tags("tags", req.tags)?,
    };
    check_and_propose(
        plane,
        Command::Admin(AdminCommand::CreateSchedulingPolicy(policy)),
    )
    .await?;
    Ok(json!({ "name": name, "arn": arn }))
}

pub(crate) async fn update<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct UpdateRequest {
        arn: Option<String>,
        fairshare_policy: Option<Value>,
    }
    let req: UpdateRequest = parse(body)?;
    let arn = required("arn", &req.arn)?.to_owned();
    caller.authorize("batch:UpdateSchedulingPolicy", &[&arn])?;
    let cmd = AdminCommand::UpdateSchedulingPolicy {
        arn,
        fairshare: Some(fairshare(req.fairshare_policy)?),
    };
    check_and_propose(plane, Command::Admin(cmd)).await?;
    Ok(json!({}))
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
        ("arn", "batch:DeleteSchedulingPolicy"),
        |arn| Ok(arn.to_owned()),
        |arn| AdminCommand::DeleteSchedulingPolicy { arn },
    )
    .await
}

pub(crate) async fn describe<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    struct DescribeRequest {
        arns: Option<Vec<String>>,
    }
    caller.authorize("batch:DescribeSchedulingPolicies", &["*"])?;
    let req: DescribeRequest = parse(body)?;
    let arns = req
        .arns
        .ok_or_else(|| ApiError::client("arns is required"))?;
    if arns.len() > 100 {
        return Err(ApiError::client(
            "arns: at most 100 may be described at once",
        ));
    }
    let found = plane
        .read(move |s| {
            arns.iter()
                .filter_map(|a| s.scheduling_policy(a))
                .map(shape)
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::from)?;
    Ok(json!({ "schedulingPolicies": found }))
}

pub(crate) async fn list<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ListRequest {
        max_results: Option<i64>,
        next_token: Option<String>,
    }
    caller.authorize("batch:ListSchedulingPolicies", &["*"])?;
    let req: ListRequest = parse(body)?;
    let limit = page_size(req.max_results, 1000)?;
    let after = req.next_token;
    let (page, more) = plane
        .read(move |s| {
            let mut all = s
                .scheduling_policies()
                .filter(|p| after.as_ref().is_none_or(|a| p.name > *a));
            let page: Vec<(String, String)> = all
                .by_ref()
                .take(limit)
                .map(|p| (p.name.clone(), p.arn.0.clone()))
                .collect();
            (page, all.next().is_some())
        })
        .await
        .map_err(ApiError::from)?;
    let token = page.last().filter(|_| more).map(|(n, _)| n.clone());
    let arns: Vec<Value> = page.iter().map(|(_, arn)| json!({"arn": arn})).collect();
    Ok(crate::request::page_answer(
        "schedulingPolicies",
        arns,
        token,
    ))
}
