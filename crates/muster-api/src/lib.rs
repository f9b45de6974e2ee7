//! `muster-api`: the AWS Batch REST-JSON API.
//!
//! Routes are `POST /v1/<operation>` exactly as botocore's model (`batch/2016-08-10`) has
//! them; request and response shapes live beside their handlers, one file per resource, and
//! are converted from `muster-core` types here and nowhere else. Errors are AWS's:
//! `400 ClientException` for anything the caller can fix (with a message naming the field),
//! `500 ServerException` only when the cluster itself cannot answer.
//!
//! Every write is checked against a linearizable read of the state first, so bad input never
//! reaches the Raft log, and answered only after its command has committed.
//!
//! The API reaches the cluster only through [`ControlPlane`]; it must not use sled or
//! openraft directly.

mod auth;
mod cluster;
mod compute_environments;
mod error;
mod iam;
mod job_definitions;
mod job_queues;
mod jobs;
mod logs;
pub use logs::LOG_GROUP;
mod request;
mod scheduling_policies;
mod semantics;
mod sts;
mod tags;

pub use auth::{MAX_CLOCK_SKEW_SECS, Principal};
pub use error::ApiError;

use auth::SignedRequest;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use muster_core::{Command, Outcome, State, Timestamp};
use std::future::Future;
use std::sync::Arc;

/// Why the cluster could not do what the API asked, told apart by whether the command may
/// have been applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaneError {
    /// Not done, and safe to ask again: no leader could be reached, the leader lacked a
    /// quorum, a read could not be confirmed, or the node is stopping.
    #[error("{0}")]
    Unavailable(String),
    /// It may or may not have been applied: the leader failed, or was replaced, while it held
    /// the command.
    #[error("{0}")]
    Indeterminate(String),
    /// Refused as asked (a membership change naming an unknown node): a client's error.
    #[error("{0}")]
    Refused(String),
}

/// A change to the control nodes, run by the leader (`muster cluster add-node` …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    AddNode {
        id: u64,
        raft_addr: String,
        grpc_addr: String,
        api_addr: String,
        /// How long the new node may take to catch up before it is made a voter.
        catch_up: std::time::Duration,
    },
    RemoveNode {
        id: u64,
    },
    TransferLeader {
        to: Option<u64>,
    },
}

/// What the API needs from the cluster. Implemented by the control node over Raft.
pub trait ControlPlane: Send + Sync + 'static {
    /// Commits a command (forwarded to the leader if need be) and returns its outcome.
    fn propose(&self, command: Command)
    -> impl Future<Output = Result<Outcome, PlaneError>> + Send;

    /// Runs `f` on a linearizable view of the state.
    fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> impl Future<Output = Result<R, PlaneError>> + Send;

    /// Runs `f` on this node's replica as it is now, without asking the leader: for lookups
    /// where a slightly old answer is safe (the access key of a caller).
    fn read_local<R>(&self, f: impl FnOnce(&State) -> R) -> R;

    /// Wall-clock time to stamp on commands (the state machine never reads a clock).
    fn now(&self) -> Timestamp;

    /// A fresh unique id (a UUID) for a new job or resource.
    fn new_id(&self) -> String;

    /// Limits operators may tune.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// Every control node's view of Raft (`muster cluster status`), as JSON: `leader`,
    /// `term`, `quorum` and `members`.
    fn cluster_status(&self) -> impl Future<Output = Result<serde_json::Value, PlaneError>> + Send {
        async {
            Err(PlaneError::Unavailable(
                "this control plane has no Raft members".into(),
            ))
        }
    }

    /// The whole state as a snapshot file (`muster cluster snapshot save`), holding every
    /// write acknowledged before the call.
    fn save_snapshot(&self) -> impl Future<Output = Result<StreamedFile, PlaneError>> + Send {
        async {
            Err(PlaneError::Unavailable(
                "this control plane takes no snapshots".into(),
            ))
        }
    }

    /// Changes the control nodes; answers what the change left, as JSON.
    fn change_membership(
        &self,
        change: MembershipChange,
    ) -> impl Future<Output = Result<serde_json::Value, PlaneError>> + Send {
        async move {
            Err(PlaneError::Unavailable(format!(
                "this control plane cannot change its members ({change:?})"
            )))
        }
    }

    /// Reads a page of an attempt's output from the agent that ran it.
    fn read_log(
        &self,
        request: LogRequest,
    ) -> impl Future<Output = Result<LogPage, String>> + Send {
        async move {
            Err(format!(
                "no agent log service at {:?} can be reached",
                request.log_address
            ))
        }
    }
}

/// Which page of which attempt's output to read, and from which agent.
#[derive(Debug, Clone)]
pub struct LogRequest {
    pub log_address: String,
    /// The agent that ran the attempt: the log service must be that agent's.
    pub node: String,
    pub job: String,
    pub attempt: u32,
    pub window: LogWindow,
    pub limit: usize,
}

/// Which events of an attempt's log a page holds (byte offsets into the agent's file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogWindow {
    /// From this offset on (a page's `next_offset`).
    From(u64),
    /// The last events.
    Last,
    /// The last events before this offset (a page's `start_offset`).
    Before(u64),
}

/// Events as `(unix milliseconds, message)`, and the byte offsets around them.
#[derive(Debug, Clone, Default)]
pub struct LogPage {
    pub events: Vec<(u64, String)>,
    pub start_offset: u64,
    pub next_offset: u64,
}

/// Request limits that differ between deployments (and that tests lower).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Smallest `timeout.attemptDurationSeconds` accepted. AWS's 60; only tests lower it.
    pub min_attempt_duration_secs: u64,
    /// Most `dependsOn` entries in one SubmitJob (AWS allows 20, which users find too few).
    pub max_depends_on: usize,
    /// Smallest `jobStateTimeLimitActions.maxTimeSeconds`. AWS's 600; only tests lower it.
    pub min_state_time_limit_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_attempt_duration_secs: 60,
            max_depends_on: 1000,
            min_state_time_limit_secs: 600,
        }
    }
}

/// The largest SubmitJob request AWS Batch accepts.
pub const SUBMIT_JOB_MAX_BYTES: usize = 30 * 1024;

/// Limits and identity the API enforces that operators may tune.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
        }
    }
}

struct Api<P> {
    plane: P,
    config: ApiConfig,
}

/// The AWS Batch router over `plane`, with the IAM administration routes Muster adds and
/// STS `GetCallerIdentity`. Every route needs a valid SigV4 signature.
pub fn router<P: ControlPlane>(plane: P, config: &ApiConfig) -> Router {
    let api = Arc::new(Api {
        plane,
        config: config.clone(),
    });
    Router::new()
        .route("/v1/iam/{operation}", post(iam_operation::<P>))
        .route("/v1/cluster/{operation}", post(cluster_operation::<P>))
        .route("/v1/{operation}", post(batch_operation::<P>))
        // botocore percent-encodes the whole ARN into one segment; other clients send it raw.
        .route("/v1/tags/{*arn}", any(tags_operation::<P>))
        // STS (query protocol) and CloudWatch Logs (JSON 1.1, told apart by X-Amz-Target).
        .route("/", post(root_operation::<P>))
        .fallback(unknown_route)
        // One byte over the limit still reaches the handlers, which answer it in AWS's terms;
        // anything larger is cut off by the server with a plain 413.
        .layer(axum::extract::DefaultBodyLimit::max(
            config.max_body_bytes + 1,
        ))
        .with_state(api)
}

/// Verifies the caller's signature for `service`.
async fn caller<P: ControlPlane>(
    api: &Api<P>,
    service: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Principal, ApiError> {
    let headers = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let req = SignedRequest {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or(""),
        headers,
        body,
    };
    // Signed for the cluster's region, which it keeps in its state (set when it was founded).
    let region = api.plane.read_local(|s| s.arn_scope().region.clone());
    auth::authenticate(&api.plane, &req, service, &region).await
}

/// What a route hands to [`signed`]: the request as it came.
type Request = (Method, Uri, HeaderMap, Bytes);

/// One signed request from start to answer: timed, its signature checked for `service`,
/// `handle` run as the signer, and the result answered in AWS's terms.
async fn signed<P: ControlPlane>(
    api: &Api<P>,
    service: &str,
    operation: &str,
    (method, uri, headers, body): &Request,
    handle: impl AsyncFnOnce(Principal) -> Result<serde_json::Value, ApiError>,
) -> Response {
    let started = std::time::Instant::now();
    let result = match caller(api, service, method, uri, headers, body).await {
        Ok(principal) => handle(principal).await,
        Err(e) => Err(e),
    };
    respond(api, operation, started, result)
}

fn respond<P: ControlPlane>(
    api: &Api<P>,
    operation: &str,
    started: std::time::Instant,
    result: Result<serde_json::Value, ApiError>,
) -> Response {
    metrics::histogram!("muster_api_request_seconds", "operation" => operation.to_owned())
        .record(started.elapsed().as_secs_f64());
    let mut response = match result {
        Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(e) => {
            tracing::debug!(operation, error = %e, "request refused");
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&api.plane.new_id()) {
        response.headers_mut().insert("x-amzn-RequestId", v);
    }
    response
}

async fn batch_operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    Path(operation): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // AWS limits a SubmitJob request to 30 KiB; other requests to the configured maximum.
    let limit = if operation == "submitjob" {
        SUBMIT_JOB_MAX_BYTES
    } else {
        api.config.max_body_bytes
    };
    if body.len() > limit {
        let refused = ApiError::client(format!(
            "request body: {} bytes is over the limit of {limit} bytes",
            body.len()
        ));
        return respond(&api, &operation, std::time::Instant::now(), Err(refused));
    }
    let request = (method, uri, headers, body);
    signed(&api, "batch", &operation, &request, async |principal| {
        dispatch(&api, &principal, &operation, &request.3).await
    })
    .await
}

/// The administration families Muster adds beside AWS Batch's operations.
#[derive(Clone, Copy)]
enum Admin {
    /// `POST /v1/iam/<operation>`.
    Iam,
    /// `POST /v1/cluster/<operation>`.
    Cluster,
}

async fn admin_operation<P: ControlPlane>(
    api: Arc<Api<P>>,
    family: Admin,
    operation: String,
    request: Request,
) -> Response {
    let body = &request.3;
    signed(
        &api,
        "batch",
        &operation,
        &request,
        async |principal| match family {
            Admin::Iam => iam::dispatch(&api.plane, &principal, &operation, body).await,
            Admin::Cluster => cluster::dispatch(&api.plane, &principal, &operation, body).await,
        },
    )
    .await
}

async fn iam_operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    Path(operation): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    admin_operation(api, Admin::Iam, operation, (method, uri, headers, body)).await
}

async fn cluster_operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    Path(operation): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if operation == "savesnapshot" {
        return save_snapshot(api, (method, uri, headers, body)).await;
    }
    admin_operation(api, Admin::Cluster, operation, (method, uri, headers, body)).await
}

/// A file answered as a response's body: `head`, then `rest` from where it stands, read a
/// chunk at a time (a snapshot file may be far larger than memory).
pub struct StreamedFile {
    pub head: Vec<u8>,
    pub rest: std::fs::File,
}

/// How much of a streamed file is read at a time.
const STREAM_CHUNK: usize = 1 << 20;

impl StreamedFile {
    fn into_body(self) -> axum::body::Body {
        use tokio::io::AsyncReadExt;
        let rest = tokio::fs::File::from_std(self.rest);
        let head = futures::stream::once(std::future::ready(Ok::<_, std::io::Error>(Bytes::from(
            self.head,
        ))));
        let rest = futures::stream::try_unfold(rest, |mut file| async move {
            let mut chunk = Vec::with_capacity(STREAM_CHUNK);
            let n = (&mut file)
                .take(STREAM_CHUNK as u64)
                .read_to_end(&mut chunk)
                .await?;
            Ok((n > 0).then(|| (Bytes::from(chunk), file)))
        });
        axum::body::Body::from_stream(futures::StreamExt::chain(head, rest))
    }
}

/// `POST /v1/cluster/savesnapshot`: the snapshot file itself as the body
/// (`application/octet-stream`), not JSON, streamed from the node's disk.
async fn save_snapshot<P: ControlPlane>(
    api: Arc<Api<P>>,
    (method, uri, headers, body): Request,
) -> Response {
    let started = std::time::Instant::now();
    let result = async {
        let principal = caller(&api, "batch", &method, &uri, &headers, &body).await?;
        principal.authorize(cluster::CLUSTER_ADMIN, &["*"])?;
        Ok::<_, ApiError>(api.plane.save_snapshot().await?)
    }
    .await;
    match result {
        Ok(file) => {
            metrics::histogram!("muster_api_request_seconds", "operation" => "SaveSnapshot")
                .record(started.elapsed().as_secs_f64());
            (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                file.into_body(),
            )
                .into_response()
        }
        Err(e) => respond(&api, "savesnapshot", started, Err(e)),
    }
}

async fn tags_operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    Path(arn): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arn = arn.trim_start_matches('/').to_owned();
    let request = (method, uri, headers, body);
    let (method, uri, _, body) = &request;
    signed(&api, "batch", "tags", &request, async |principal| {
        let query = uri.query().unwrap_or("");
        tags::dispatch(&api.plane, &principal, method.as_str(), &arn, query, body).await
    })
    .await
}

async fn root_operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(operation) = target
        .as_deref()
        .and_then(|t| t.strip_prefix(logs::TARGET_PREFIX))
    {
        let request = (method, uri, headers, body);
        let body = &request.3;
        return logs::respond(
            signed(&api, "logs", operation, &request, async |principal| {
                logs::dispatch(&api.plane, &principal, operation, body).await
            })
            .await,
        );
    }
    match caller(&api, "sts", &method, &uri, &headers, &body).await {
        Ok(principal) => sts::answer(&principal, &body, &api.plane.new_id()),
        Err(e) => sts::error(&e),
    }
}

async fn dispatch<P: ControlPlane>(
    api: &Api<P>,
    caller: &Principal,
    operation: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let plane = &api.plane;
    match operation {
        "createcomputeenvironment" => compute_environments::create(plane, caller, body).await,
        "describecomputeenvironments" => compute_environments::describe(plane, caller, body).await,
        "updatecomputeenvironment" => compute_environments::update(plane, caller, body).await,
        "deletecomputeenvironment" => compute_environments::delete(plane, caller, body).await,
        "createjobqueue" => job_queues::create(plane, caller, body).await,
        "describejobqueues" => job_queues::describe(plane, caller, body).await,
        "updatejobqueue" => job_queues::update(plane, caller, body).await,
        "deletejobqueue" => job_queues::delete(plane, caller, body).await,
        "getjobqueuesnapshot" => job_queues::snapshot(plane, caller, body).await,
        "registerjobdefinition" => job_definitions::register(plane, caller, body).await,
        "describejobdefinitions" => job_definitions::describe(plane, caller, body).await,
        "submitjob" => jobs::submit(plane, caller, body).await,
        "describejobs" => jobs::describe(plane, caller, body).await,
        "listjobs" => jobs::list(plane, caller, body).await,
        "terminatejob" => jobs::terminate(plane, caller, body).await,
        "canceljob" => jobs::cancel(plane, caller, body).await,
        "deregisterjobdefinition" => job_definitions::deregister(plane, caller, body).await,
        "createschedulingpolicy" => scheduling_policies::create(plane, caller, body).await,
        "updateschedulingpolicy" => scheduling_policies::update(plane, caller, body).await,
        "deleteschedulingpolicy" => scheduling_policies::delete(plane, caller, body).await,
        "describeschedulingpolicies" => scheduling_policies::describe(plane, caller, body).await,
        "listschedulingpolicies" => scheduling_policies::list(plane, caller, body).await,
        other => Err(ApiError::client(format!(
            "operation {other} is not supported by Muster yet"
        ))),
    }
}

async fn unknown_route() -> Response {
    ApiError::client("unknown route: AWS Batch operations are POST /v1/<operation>").into_response()
}

/// The ARN a resource of `kind` named `name` has (or would have) in this cluster.
fn arn_of<P: ControlPlane>(plane: &P, kind: &str, name: &str) -> String {
    plane.read_local(|s| s.arn_scope().arn(kind, name).0)
}

/// Refuses what the command level `level` brought (`what`, named by its `field`) while the
/// cluster is below it: a control node of an earlier release would refuse or misapply it.
fn require_level<P: ControlPlane>(
    plane: &P,
    level: u32,
    field: &str,
    what: &str,
) -> Result<(), ApiError> {
    let cluster = plane.read_local(|s| s.cluster_level());
    if cluster < level {
        return Err(ApiError::client(format!(
            "{field}: {what} need every control node at command level {level} or later; this \
             cluster is at level {cluster} (a control node runs an earlier release: upgrade it, \
             and the level rises on its own within seconds)"
        )));
    }
    Ok(())
}

/// A Delete operation of one resource, named in the body's member `field` (by name or ARN):
/// `arn_of_target` finds the ARN the caller needs `action` on (or says the resource does not
/// exist), and `command` makes the deletion to propose.
async fn delete_one<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    body: &[u8],
    (field, action): (&str, &str),
    arn_of_target: impl FnOnce(&str) -> Result<String, ApiError>,
    command: impl FnOnce(String) -> muster_core::AdminCommand,
) -> Result<serde_json::Value, ApiError> {
    let members: std::collections::BTreeMap<String, serde_json::Value> = request::parse(body)?;
    let target: Option<String> = members
        .get(field)
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| ApiError::client(format!("{field}: {e}")))?;
    let target = request::required(field, &target)?.to_owned();
    caller.authorize(action, &[&arn_of_target(&target)?])?;
    check_and_propose(plane, Command::Admin(command(target))).await?;
    Ok(serde_json::json!({}))
}

/// Checks `command` against the current state, then proposes it. Nothing reaches the log
/// unless the check passed; apply checks again against the state the command meets.
async fn check_and_propose<P: ControlPlane>(
    plane: &P,
    command: Command,
) -> Result<Outcome, ApiError> {
    // Refused input never reaches the log. This node's replica answers first, without a
    // round trip; only when it refuses is the refusal confirmed on a linearizable view (the
    // replica may not have applied, say, a queue created a moment ago through another node).
    // Applying re-checks everything, so a command that passes here and then races with
    // another is still refused with the same error.
    if plane.read_local(|state| state.check(&command)).is_err() {
        let probe = command.clone();
        plane
            .read(move |state| state.check(&probe))
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
    }
    match plane.propose(command).await.map_err(ApiError::from)? {
        Outcome::Rejected(rejection) => Err(rejection.into()),
        outcome => Ok(outcome),
    }
}

#[cfg(test)]
mod tests;
