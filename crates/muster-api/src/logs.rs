//! CloudWatch Logs `GetLogEvents` (JSON 1.1 protocol: `POST /` with
//! `X-Amz-Target: Logs_20140328.GetLogEvents`), so that `aws logs get-log-events` and the
//! tools that read AWS Batch job output (Airflow, Nextflow, Luigi, Metaflow) work against
//! Muster. Jobs log to group `/aws/batch/job` under the stream in `container.logStreamName`;
//! the events are read from the agent that ran the attempt.

use crate::{ApiError, ControlPlane, LogRequest, Principal};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use muster_core::{JobId, State};
use serde::Deserialize;
use serde_json::{Value, json};

pub(crate) const TARGET_PREFIX: &str = "Logs_20140328.";

/// The one log group AWS Batch writes job output to.
pub const LOG_GROUP: &str = "/aws/batch/job";

/// Events per page when the caller sets no `limit` (CloudWatch's maximum is 10,000).
const DEFAULT_LIMIT: usize = 1_000;

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "ResourceNotFoundException",
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "InvalidParameterException",
        message: message.into(),
    }
}

/// JSON 1.1 answers carry their own content type.
pub(crate) fn respond(mut response: Response) -> Response {
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    response
}

pub(crate) async fn dispatch<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    operation: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    match operation {
        "GetLogEvents" => get_log_events(plane, caller, body).await,
        other => Err(invalid(format!(
            "operation {other}: Muster serves only GetLogEvents of CloudWatch Logs"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GetLogEventsRequest {
    log_group_name: Option<String>,
    log_group_identifier: Option<String>,
    log_stream_name: Option<String>,
    next_token: Option<String>,
    start_from_head: Option<bool>,
    limit: Option<i64>,
}

/// Where a page starts: a token this API handed out (`f/<offset>` forward, `b/<offset>`
/// backward), or the head or the tail of the stream.
enum Start {
    Offset(u64),
    Tail,
}

async fn get_log_events<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: GetLogEventsRequest = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("request body is not a GetLogEvents request: {e}")))?;
    let group = req
        .log_group_name
        .or(req.log_group_identifier)
        .ok_or_else(|| invalid("logGroupName is required"))?;
    let stream = req
        .log_stream_name
        .ok_or_else(|| invalid("logStreamName is required"))?;
    let limit = match req.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => return Err(invalid(format!("limit: {n} must be between 1 and 10000"))),
    };
    let region_account = plane.read_local(|s| {
        let scope = s.arn_scope();
        (scope.region.clone(), scope.account.clone())
    });
    caller.authorize(
        "logs:GetLogEvents",
        &[&format!(
            "arn:aws:logs:{}:{}:log-group:{group}:log-stream:{stream}",
            region_account.0, region_account.1
        )],
    )?;
    if group != LOG_GROUP {
        return Err(not_found(format!(
            "The specified log group does not exist: Muster's jobs log to {LOG_GROUP}"
        )));
    }
    let start = match req.next_token.as_deref() {
        Some(token) => parse_token(token)?,
        None if req.start_from_head == Some(true) => Start::Offset(0),
        None => Start::Tail,
    };
    let (job, attempt) = parse_stream(&stream)
        .ok_or_else(|| not_found(format!("The specified log stream does not exist: {stream}")))?;
    let log_address = plane
        .read_local(|s| log_address_of(s, &job, attempt, &stream))
        .ok_or_else(|| not_found(format!("The specified log stream does not exist: {stream}")))?;
    let (offset, from_end) = match start {
        Start::Offset(o) => (o, false),
        Start::Tail => (0, true),
    };
    let page = plane
        .read_log(LogRequest {
            log_address,
            job: job.to_string(),
            attempt,
            offset,
            limit,
            from_end,
        })
        .await
        .map_err(|e| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "ServiceUnavailableException",
            message: format!("the agent that ran this attempt did not answer: {e}"),
        })?;
    let events: Vec<Value> = page
        .events
        .iter()
        .map(|(at, message)| json!({"timestamp": at, "message": message, "ingestionTime": at}))
        .collect();
    Ok(json!({
        "events": events,
        "nextForwardToken": format!("f/{}", page.next_offset),
        "nextBackwardToken": format!("b/{}", page.start_offset),
    }))
}

fn parse_token(token: &str) -> Result<Start, ApiError> {
    let bad = || {
        invalid(format!(
            "nextToken: {token} is not a token this API handed out"
        ))
    };
    let (direction, offset) = token.split_once('/').ok_or_else(bad)?;
    let offset: u64 = offset.parse().map_err(|_| bad())?;
    match direction {
        "f" | "b" => Ok(Start::Offset(offset)),
        _ => Err(bad()),
    }
}

/// `<jobName>/default/<jobId>-<attempt>` (see `Job::log_stream_name`) → job id and attempt.
fn parse_stream(stream: &str) -> Option<(JobId, u32)> {
    let (_, last) = stream.rsplit_once('/')?;
    let (job, attempt) = last.rsplit_once('-')?;
    Some((JobId::from(job.to_owned()), attempt.parse().ok()?))
}

/// The log service of the node that ran `attempt` of `job`, if the stream is that attempt's.
fn log_address_of(state: &State, job: &JobId, attempt: u32, stream: &str) -> Option<String> {
    let job = state.job(job)?;
    if job.log_stream_name(attempt) != stream {
        return None;
    }
    let node = match &job.active {
        Some(a) if a.number == attempt => a.node.clone(),
        _ => job
            .attempts
            .get(attempt.checked_sub(1)? as usize)?
            .node
            .clone(),
    };
    let address = state.node(&node)?.inventory.log_address.clone();
    (!address.is_empty()).then_some(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_name_their_job_and_attempt() {
        let (job, attempt) =
            parse_stream("train/default/1b4e28ba-2fa1-11d2-883f-0016d3cca427:7-2").unwrap();
        assert_eq!(
            (job.as_str(), attempt),
            ("1b4e28ba-2fa1-11d2-883f-0016d3cca427:7", 2)
        );
        assert!(parse_stream("no-slash").is_none());
        assert!(matches!(parse_token("f/42"), Ok(Start::Offset(42))));
        assert!(parse_token("x/1").is_err() && parse_token("f/nope").is_err());
    }
}
