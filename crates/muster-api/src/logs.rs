//! CloudWatch Logs `GetLogEvents` (JSON 1.1 protocol: `POST /` with
//! `X-Amz-Target: Logs_20140328.GetLogEvents`), so that `aws logs get-log-events` and the
//! tools that read AWS Batch job output (Airflow, Nextflow, Luigi, Metaflow) work against
//! Muster. Jobs log to group `/aws/batch/job` under the stream in `container.logStreamName`;
//! the events are read from the agent that ran the attempt.

use crate::{ApiError, ControlPlane, LogRequest, LogWindow, Principal};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use muster_core::{JobId, State};
use serde::Deserialize;
use serde_json::{Value, json};

pub(crate) const TARGET_PREFIX: &str = "Logs_20140328.";

/// The one log group AWS Batch writes job output to.
pub const LOG_GROUP: &str = muster_core::DEFAULT_LOG_GROUP;

/// Events per page when the caller sets no `limit`: CloudWatch's 10,000 (or 1 MB, which the
/// agent bounds a page to).
const DEFAULT_LIMIT: usize = 10_000;

/// The definition's `containerProperties.logConfiguration` of `job`, if it set one.
pub(crate) fn log_configuration<'a>(state: &'a State, job: &muster_core::Job) -> Option<&'a Value> {
    state
        .definition(&job.spec.definition_arn.0)?
        .extra
        .get("containerProperties")?
        .get("logConfiguration")
}

/// The log group `job`'s output is served in: its definition's `awslogs-group` where it uses
/// the `awslogs` driver with one, else [`LOG_GROUP`].
fn log_group_of(state: &State, job: &muster_core::Job) -> String {
    state.log_group_of(job).to_owned()
}

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
        "DescribeLogStreams" => describe_log_streams(plane, caller, body).await,
        "FilterLogEvents" => filter_log_events(plane, caller, body).await,
        other => Err(invalid(format!(
            "operation {other}: Muster serves GetLogEvents, DescribeLogStreams and FilterLogEvents of CloudWatch Logs"
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
    start_time: Option<u64>,
    end_time: Option<u64>,
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
    let window = match req.next_token.as_deref() {
        Some(token) => parse_token(token)?,
        None if req.start_from_head == Some(true) => LogWindow::From(0),
        None => LogWindow::Last,
    };
    let (job, attempt) = parse_stream(&stream)
        .ok_or_else(|| not_found(format!("The specified log stream does not exist: {stream}")))?;
    let (log_address, job_group) = plane
        .read_local(|s| {
            let address = log_address_of(s, &job, attempt, &stream)?;
            Some((address, log_group_of(s, &*s.find_job(&job)?)))
        })
        .ok_or_else(|| not_found(format!("The specified log stream does not exist: {stream}")))?;
    if group != job_group {
        return Err(not_found(format!(
            "The specified log stream does not exist in {group}: {stream} is in {job_group}"
        )));
    }
    let page = read_page(plane, log_address, &job, attempt, window, limit).await?;
    // `startTime` and `endTime` bound the events by their time stamps, end excluded.
    let within = |at: u64| {
        req.start_time.is_none_or(|from| at >= from) && req.end_time.is_none_or(|to| at < to)
    };
    let events: Vec<Value> = page
        .events
        .iter()
        .filter(|(at, _)| within(*at))
        .map(|(at, message)| json!({"timestamp": at, "message": message, "ingestionTime": at}))
        .collect();
    Ok(json!({
        "events": events,
        "nextForwardToken": format!("f/{}", page.next_offset),
        "nextBackwardToken": format!("b/{}", page.start_offset),
    }))
}

/// A token this API handed out: `f/<offset>` reads on from a page's end, `b/<offset>` the
/// page before a page's start.
fn parse_token(token: &str) -> Result<LogWindow, ApiError> {
    let bad = || {
        invalid(format!(
            "nextToken: {token} is not a token this API handed out"
        ))
    };
    let (direction, offset) = token.split_once('/').ok_or_else(bad)?;
    let offset: u64 = offset.parse().map_err(|_| bad())?;
    match direction {
        "f" => Ok(LogWindow::From(offset)),
        "b" => Ok(LogWindow::Before(offset)),
        _ => Err(bad()),
    }
}

/// One page of an attempt's log from the agent that ran it.
async fn read_page<P: ControlPlane>(
    plane: &P,
    (node, log_address): (String, String),
    job: &JobId,
    attempt: u32,
    window: LogWindow,
    limit: usize,
) -> Result<crate::LogPage, ApiError> {
    plane
        .read_log(LogRequest {
            log_address,
            node,
            job: job.to_string(),
            attempt,
            window,
            limit,
        })
        .await
        .map_err(|e| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "ServiceUnavailableException",
            message: format!("the agent that ran this attempt did not answer: {e}"),
        })
}

/// Checks the caller's right to `action` on the group, and that it exists: `/aws/batch/job`,
/// or a group that a definition's `awslogs-group` gives to jobs.
fn log_group<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    action: &str,
    group: Option<String>,
) -> Result<String, ApiError> {
    let group = group.ok_or_else(|| invalid("logGroupName is required"))?;
    let (region, account) = plane.read_local(|s| {
        let scope = s.arn_scope();
        (scope.region.clone(), scope.account.clone())
    });
    caller.authorize(
        action,
        &[&format!(
            "arn:aws:logs:{region}:{account}:log-group:{group}"
        )],
    )?;
    // Definitions are kept for good (deregistered ones too), jobs only for their retention.
    let exists = group == LOG_GROUP
        || plane.read_local(|s| {
            s.definitions()
                .any(|d| d.awslogs_group() == Some(group.as_str()))
        });
    if !exists {
        return Err(not_found(format!(
            "The specified log group does not exist: {group}"
        )));
    }
    Ok(group)
}

/// Streams of ended jobs' attempts (which left memory) read at most where the whole list is
/// read: DescribeLogStreams sorted another way than by name ascending (`orderBy:
/// LastEventTime`, or descending), and FilterLogEvents. Pages by name, ascending, are read
/// from where the last page ended and have no such bound.
const ARCHIVED_STREAMS_LISTED: usize = 100_000;

/// A stream as DescribeLogStreams lists it: (name, job, attempt, when it was placed or
/// started, when it stopped).
type Stream = (String, JobId, u32, u64, Option<u64>);

/// The streams in `group` whose names start with `prefix` and sort after `after` (when
/// given), by name: every one of jobs in memory, and up to `archived` of ended jobs that
/// left memory.
fn streams(
    state: &State,
    group: &str,
    prefix: &str,
    after: Option<&str>,
    archived: usize,
) -> Vec<Stream> {
    let mut out: Vec<_> = state
        .archived_streams(group, prefix, after, archived)
        .into_iter()
        .map(|s| (s.name, s.job, s.attempt, s.created_ms, Some(s.stopped_ms)))
        .collect();
    let wanted = |name: &str| muster_core::stream_listed(name, prefix, after);
    for job in state.jobs().filter(|j| log_group_of(state, j) == group) {
        for (i, record) in job.attempts.iter().enumerate() {
            let name = record.log_stream_name.clone();
            if wanted(&name) {
                let created = record.started_at.unwrap_or(record.stopped_at).as_millis();
                out.push((
                    name,
                    job.id.clone(),
                    i as u32 + 1,
                    created,
                    Some(record.stopped_at.as_millis()),
                ));
            }
        }
        if let Some(active) = &job.active {
            let name = job.log_stream_name(active.number);
            if wanted(&name) {
                let created = active.started_at.unwrap_or(active.placed_at).as_millis();
                out.push((name, job.id.clone(), active.number, created, None));
            }
        }
    }
    out.sort();
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeLogStreamsRequest {
    log_group_name: Option<String>,
    log_group_identifier: Option<String>,
    log_stream_name_prefix: Option<String>,
    order_by: Option<String>,
    descending: Option<bool>,
    limit: Option<i64>,
    next_token: Option<String>,
}

/// DescribeLogStreams of `/aws/batch/job`: every attempt's stream, by name (or by when it
/// last ran, `orderBy: LastEventTime`), 50 a page.
async fn describe_log_streams<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: DescribeLogStreamsRequest = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "request body is not a DescribeLogStreams request: {e}"
        ))
    })?;
    let group = log_group(
        plane,
        caller,
        "logs:DescribeLogStreams",
        req.log_group_name.or(req.log_group_identifier),
    )?;
    let limit = match req.limit {
        None => 50,
        Some(n) if (1..=50).contains(&n) => n as usize,
        Some(n) => return Err(invalid(format!("limit: {n} must be between 1 and 50"))),
    };
    let by_time = match req.order_by.as_deref() {
        None | Some("LogStreamName") => false,
        Some("LastEventTime") if req.log_stream_name_prefix.is_some() => {
            return Err(invalid(
                "Cannot order by LastEventTime with a logStreamNamePrefix.",
            ));
        }
        Some("LastEventTime") => true,
        Some(other) => {
            return Err(invalid(format!(
                "orderBy: {other} must be one of LogStreamName | LastEventTime"
            )));
        }
    };
    let prefix = req.log_stream_name_prefix.unwrap_or_default();
    let bad_token = |t: &str| invalid(format!("nextToken: {t} is not a token this API handed out"));
    // By name, ascending (what clients ask for unless told otherwise): each page is read from
    // after the last name of the one before (`after:<name>`), so paging has no end but the
    // last stream. Other orders sort the whole list and count their place in it.
    // (A numeric token, which releases before handed out for this order too, goes on by place.)
    let numeric_token = req
        .next_token
        .as_deref()
        .is_some_and(|t| t.parse::<usize>().is_ok());
    let by_cursor = !by_time && req.descending != Some(true) && !numeric_token;
    let (page, next): (Vec<Stream>, Option<String>) = if by_cursor {
        let after = match req.next_token.as_deref() {
            None => None,
            Some(t) => Some(
                t.strip_prefix("after:")
                    .ok_or_else(|| bad_token(t))?
                    .to_owned(),
            ),
        };
        let mut found =
            plane.read_local(|s| streams(s, &group, &prefix, after.as_deref(), limit + 1));
        let more = found.len() > limit;
        found.truncate(limit);
        let next = more
            .then(|| found.last().map(|(name, ..)| format!("after:{name}")))
            .flatten();
        (found, next)
    } else {
        let mut all =
            plane.read_local(|s| streams(s, &group, &prefix, None, ARCHIVED_STREAMS_LISTED));
        if by_time {
            all.sort_by_key(|(name, _, _, created, stopped)| {
                (stopped.unwrap_or(u64::MAX).max(*created), name.clone())
            });
        }
        if req.descending == Some(true) {
            all.reverse();
        }
        let skip = match req.next_token.as_deref() {
            None => 0,
            Some(t) => t.parse::<usize>().map_err(|_| bad_token(t))?,
        };
        let next = (skip + limit < all.len()).then(|| (skip + limit).to_string());
        (all.into_iter().skip(skip).take(limit).collect(), next)
    };
    let (region, account) = plane.read_local(|s| {
        let scope = s.arn_scope();
        (scope.region.clone(), scope.account.clone())
    });
    let page: Vec<Value> = page
        .iter()
        .map(|(name, _, _, created, stopped)| {
            let mut stream = json!({
                "logStreamName": name,
                "creationTime": created,
                "arn": format!("arn:aws:logs:{region}:{account}:log-group:{group}:log-stream:{name}"),
                "storedBytes": 0,
            });
            if let Some(stopped) = stopped {
                stream["lastEventTimestamp"] = json!(stopped);
            }
            stream
        })
        .collect();
    let mut answer = json!({ "logStreams": page });
    if let Some(next) = next {
        answer["nextToken"] = json!(next);
    }
    Ok(answer)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilterLogEventsRequest {
    log_group_name: Option<String>,
    log_group_identifier: Option<String>,
    log_stream_names: Option<Vec<String>>,
    log_stream_name_prefix: Option<String>,
    start_time: Option<u64>,
    end_time: Option<u64>,
    filter_pattern: Option<String>,
    limit: Option<i64>,
    next_token: Option<String>,
}

/// Pages read from agents in one FilterLogEvents call at most; the rest is for the next call.
const FILTER_PAGES_PER_CALL: usize = 64;

/// FilterLogEvents of `/aws/batch/job`: the events of the named streams (or those with a
/// prefix, or all) in stream order, within `startTime`..`endTime`, that match the pattern:
/// plain terms and quoted phrases that must all appear, `-term` that must not.
async fn filter_log_events<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: FilterLogEventsRequest = serde_json::from_slice(body).map_err(|e| {
        invalid(format!(
            "request body is not a FilterLogEvents request: {e}"
        ))
    })?;
    let group = log_group(
        plane,
        caller,
        "logs:FilterLogEvents",
        req.log_group_name.or(req.log_group_identifier),
    )?;
    if req.log_stream_names.is_some() && req.log_stream_name_prefix.is_some() {
        return Err(invalid(
            "logStreamNames and logStreamNamePrefix cannot both be given",
        ));
    }
    let limit = match req.limit {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => return Err(invalid(format!("limit: {n} must be between 1 and 10000"))),
    };
    let pattern = Pattern::parse(req.filter_pattern.as_deref().unwrap_or_default());
    let prefix = req.log_stream_name_prefix.clone().unwrap_or_default();
    let mut all = plane.read_local(|s| streams(s, &group, &prefix, None, ARCHIVED_STREAMS_LISTED));
    if let Some(names) = &req.log_stream_names {
        all.retain(|(name, ..)| names.contains(name));
    }
    // The token: the stream to go on with and the byte offset in it.
    let (mut index, mut offset) = match req.next_token.as_deref() {
        None => (0usize, 0u64),
        Some(t) => t
            .split_once('/')
            .and_then(|(i, o)| Some((i.parse().ok()?, o.parse().ok()?)))
            .ok_or_else(|| invalid(format!("nextToken: {t} is not a token this API handed out")))?,
    };
    let mut events = Vec::new();
    let mut pages = 0;
    while index < all.len() && events.len() < limit && pages < FILTER_PAGES_PER_CALL {
        let (name, job, attempt, ..) = &all[index];
        let Some(address) = plane.read_local(|s| log_address_of(s, job, *attempt, name)) else {
            (index, offset) = (index + 1, 0);
            continue;
        };
        let page = read_page(
            plane,
            address,
            job,
            *attempt,
            LogWindow::From(offset),
            limit - events.len(),
        )
        .await?;
        pages += 1;
        for (at, message) in &page.events {
            let within = req.start_time.is_none_or(|from| *at >= from)
                && req.end_time.is_none_or(|to| *at <= to);
            if within && pattern.matches(message) {
                events.push(json!({"logStreamName": name, "timestamp": at, "message": message,
                                   "ingestionTime": at, "eventId": format!("{name}/{at}/{}", events.len())}));
            }
        }
        if page.events.is_empty() || page.next_offset == offset {
            (index, offset) = (index + 1, 0);
        } else {
            offset = page.next_offset;
        }
    }
    let mut answer = json!({ "events": events, "searchedLogStreams": [] });
    if index < all.len() {
        answer["nextToken"] = json!(format!("{index}/{offset}"));
    }
    Ok(answer)
}

/// A CloudWatch filter pattern of plain terms and quoted phrases (all must appear, case
/// sensitive, as CloudWatch matches them) and `-term`s (none may appear). Empty matches all.
#[derive(Debug, Default, PartialEq)]
struct Pattern {
    required: Vec<String>,
    excluded: Vec<String>,
}

impl Pattern {
    fn parse(text: &str) -> Self {
        let mut pattern = Pattern::default();
        let mut rest = text.trim();
        while !rest.is_empty() {
            let (excluded, body) = match rest.strip_prefix('-') {
                Some(after) => (true, after),
                None => (false, rest),
            };
            let (term, after) = match body.strip_prefix('"') {
                Some(quoted) => match quoted.find('"') {
                    Some(end) => (&quoted[..end], &quoted[end + 1..]),
                    None => (quoted, ""),
                },
                None => match body.find(char::is_whitespace) {
                    Some(end) => (&body[..end], &body[end..]),
                    None => (body, ""),
                },
            };
            if !term.is_empty() {
                let list = if excluded {
                    &mut pattern.excluded
                } else {
                    &mut pattern.required
                };
                list.push(term.to_owned());
            }
            rest = after.trim_start();
        }
        pattern
    }

    fn matches(&self, message: &str) -> bool {
        self.required.iter().all(|t| message.contains(t.as_str()))
            && !self.excluded.iter().any(|t| message.contains(t.as_str()))
    }
}

/// `<jobName>/default/<jobId>-<attempt>` (see `Job::log_stream_name`) → job id and attempt.
fn parse_stream(stream: &str) -> Option<(JobId, u32)> {
    let (_, last) = stream.rsplit_once('/')?;
    let (job, attempt) = last.rsplit_once('-')?;
    Some((JobId::from(job.to_owned()), attempt.parse().ok()?))
}

/// The node that ran `attempt` of `job` and its log service, if the stream is that attempt's.
fn log_address_of(
    state: &State,
    job: &JobId,
    attempt: u32,
    stream: &str,
) -> Option<(String, String)> {
    let job = state.find_job(job)?;
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
    (!address.is_empty()).then_some((node.0, address))
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
        assert!(matches!(parse_token("f/42"), Ok(LogWindow::From(42))));
        assert!(matches!(parse_token("b/42"), Ok(LogWindow::Before(42))));
        assert!(parse_token("x/1").is_err() && parse_token("f/nope").is_err());
    }

    #[test]
    fn filter_patterns_take_terms_phrases_and_exclusions() {
        let p = Pattern::parse(r#"ERROR "disk full" -retry"#);
        assert_eq!(
            p,
            Pattern {
                required: vec!["ERROR".into(), "disk full".into()],
                excluded: vec!["retry".into()],
            }
        );
        assert!(p.matches("ERROR: the disk full again"));
        assert!(!p.matches("ERROR: disk is full"));
        assert!(!p.matches("ERROR: disk full, retry"));
        assert!(Pattern::parse("  ").matches("anything"));
    }
}
