//! Parsing the members that steer a job's life: `retryStrategy`, `timeout`,
//! `arrayProperties` and `dependsOn`, with AWS Batch's limits (and Muster's wider
//! `dependsOn` limit).

use crate::ApiError;
use muster_core::{Dependency, DependencyKind, ExitRule, JobId, RetryAction, RetryStrategy};
use serde_json::Value;

fn object<'a>(field: &str, v: &'a Value) -> Result<&'a serde_json::Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::client(format!("{field} must be an object")))
}

/// A pattern of `evaluateOnExit`: at most 512 characters, ending optionally in `*`.
fn pattern(
    field: &str,
    v: Option<&Value>,
    allowed: impl Fn(char) -> bool,
) -> Result<Option<String>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let s = v
        .as_str()
        .ok_or_else(|| ApiError::client(format!("{field} must be a string")))?;
    let body = s.strip_suffix('*').unwrap_or(s);
    if s.len() > 512 || !body.chars().all(allowed) {
        return Err(ApiError::client(format!(
            "{field}: '{s}' is not a valid pattern (at most 512 characters; only a trailing * is a wildcard)"
        )));
    }
    Ok(Some(s.to_owned()))
}

pub(crate) fn retry_strategy(
    field: &str,
    value: &Option<Value>,
) -> Result<Option<RetryStrategy>, ApiError> {
    let Some(v) = value.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = object(field, v)?;
    let rules = match obj.get("evaluateOnExit") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rules)) => rules.clone(),
        Some(_) => {
            return Err(ApiError::client(format!(
                "{field}.evaluateOnExit must be a list"
            )));
        }
    };
    let attempts = match obj.get("attempts") {
        None | Some(Value::Null) if rules.is_empty() => 1,
        None | Some(Value::Null) => {
            return Err(ApiError::client(format!(
                "{field}.attempts is required with evaluateOnExit"
            )));
        }
        Some(a) => a.as_i64().filter(|a| (1..=10).contains(a)).ok_or_else(|| {
            ApiError::client(format!("{field}.attempts: {a} must be between 1 and 10"))
        })?,
    };
    if rules.len() > 5 {
        return Err(ApiError::client(format!(
            "{field}.evaluateOnExit: at most 5 rules are allowed (got {})",
            rules.len()
        )));
    }
    let text = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == ':' || c.is_whitespace();
    let evaluate_on_exit = rules
        .iter()
        .map(|r| {
            let f = format!("{field}.evaluateOnExit");
            let r = object(&f, r)?;
            let action = match r
                .get("action")
                .and_then(Value::as_str)
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                Some("RETRY") => RetryAction::Retry,
                Some("EXIT") => RetryAction::Exit,
                _ => {
                    return Err(ApiError::client(format!(
                        "{f}.action must be one of RETRY | EXIT"
                    )));
                }
            };
            Ok(ExitRule {
                on_status_reason: pattern(
                    &format!("{f}.onStatusReason"),
                    r.get("onStatusReason"),
                    text,
                )?,
                on_reason: pattern(&format!("{f}.onReason"), r.get("onReason"), text)?,
                on_exit_code: pattern(&format!("{f}.onExitCode"), r.get("onExitCode"), |c| {
                    c.is_ascii_digit()
                })?,
                action,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(RetryStrategy {
        attempts: attempts as u32,
        evaluate_on_exit,
    }))
}

/// `timeout.attemptDurationSeconds`, at least `min_secs` (60 unless a test lowers it).
pub(crate) fn timeout(
    field: &str,
    value: &Option<Value>,
    min_secs: u64,
) -> Result<Option<u64>, ApiError> {
    let Some(v) = value.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = object(field, v)?;
    match obj.get("attemptDurationSeconds") {
        None | Some(Value::Null) => Ok(None),
        Some(d) => d.as_u64().filter(|d| *d >= min_secs).map(Some).ok_or_else(|| {
            ApiError::client(format!("{field}.attemptDurationSeconds: {d} must be a whole number of seconds, at least {min_secs}"))
        }),
    }
}

pub(crate) fn array_size(value: &Option<Value>) -> Result<Option<u32>, ApiError> {
    let Some(v) = value.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = object("arrayProperties", v)?;
    match obj.get("size") {
        None | Some(Value::Null) => Ok(None),
        Some(s) => s
            .as_u64()
            .filter(|s| (2..=10_000).contains(s))
            .map(|s| Some(s as u32))
            .ok_or_else(|| {
                ApiError::client(format!(
                    "arrayProperties.size: {s} must be between 2 and 10000"
                ))
            }),
    }
}

pub(crate) fn depends_on(
    value: &Option<Vec<Value>>,
    limit: usize,
) -> Result<Vec<Dependency>, ApiError> {
    let deps = value.as_deref().unwrap_or_default();
    if deps.len() > limit {
        return Err(ApiError::client(format!(
            "dependsOn: at most {limit} dependencies are allowed (got {})",
            deps.len()
        )));
    }
    deps.iter()
        .map(|d| {
            let d = object("dependsOn", d)?;
            let kind = match d.get("type").and_then(Value::as_str) {
                None => DependencyKind::Plain,
                Some("N_TO_N") => DependencyKind::NToN,
                Some("SEQUENTIAL") => DependencyKind::Sequential,
                Some(other) => {
                    return Err(ApiError::client(format!(
                        "dependsOn.type: {other} must be one of N_TO_N | SEQUENTIAL"
                    )));
                }
            };
            let job = d
                .get("jobId")
                .and_then(Value::as_str)
                .filter(|j| !j.is_empty())
                .map(|j| JobId::from(j.to_owned()));
            if job.is_none() && kind != DependencyKind::Sequential {
                return Err(ApiError::client("dependsOn.jobId is required"));
            }
            Ok(Dependency { job, kind })
        })
        .collect()
}
