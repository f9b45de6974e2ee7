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

mod compute_environments;
mod error;
mod job_definitions;
mod job_queues;
mod jobs;
mod request;

pub use error::ApiError;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use muster_core::{Command, Outcome, State, Timestamp};
use std::future::Future;
use std::sync::Arc;

/// What the API needs from the cluster. Implemented by the control node over Raft.
pub trait ControlPlane: Send + Sync + 'static {
    /// Commits a command (forwarded to the leader if need be) and returns its outcome.
    fn propose(&self, command: Command) -> impl Future<Output = Result<Outcome, String>> + Send;

    /// Runs `f` on a linearizable view of the state.
    fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> impl Future<Output = Result<R, String>> + Send;

    /// Wall-clock time to stamp on commands (the state machine never reads a clock).
    fn now(&self) -> Timestamp;

    /// A fresh unique id (a UUID) for a new job or resource.
    fn new_id(&self) -> String;
}

/// Limits the API enforces that users may tune.
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
}

/// The AWS Batch router over `plane`.
pub fn router<P: ControlPlane>(plane: P, config: &ApiConfig) -> Router {
    let api = Arc::new(Api { plane });
    Router::new()
        .route("/v1/{operation}", post(operation::<P>))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(api)
}

async fn operation<P: ControlPlane>(
    AxumState(api): AxumState<Arc<Api<P>>>,
    Path(operation): Path<String>,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let result = dispatch(&api, &operation, &body).await;
    metrics::histogram!("muster_api_request_seconds", "operation" => operation.clone())
        .record(started.elapsed().as_secs_f64());
    let request_id = api.plane.new_id();
    let mut response = match result {
        Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
        Err(e) => {
            tracing::debug!(operation, error = %e, "request refused");
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-amzn-RequestId", v);
    }
    response
}

async fn dispatch<P: ControlPlane>(
    api: &Api<P>,
    operation: &str,
    body: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let plane = &api.plane;
    match operation {
        "createcomputeenvironment" => compute_environments::create(plane, body).await,
        "describecomputeenvironments" => compute_environments::describe(plane, body).await,
        "createjobqueue" => job_queues::create(plane, body).await,
        "describejobqueues" => job_queues::describe(plane, body).await,
        "registerjobdefinition" => job_definitions::register(plane, body).await,
        "describejobdefinitions" => job_definitions::describe(plane, body).await,
        "submitjob" => jobs::submit(plane, body).await,
        "describejobs" => jobs::describe(plane, body).await,
        "listjobs" => jobs::list(plane, body).await,
        "terminatejob" => jobs::terminate(plane, body).await,
        other => Err(ApiError::client(format!(
            "operation {other} is not supported by Muster yet"
        ))),
    }
}

async fn unknown_route() -> Response {
    ApiError::client("unknown route: AWS Batch operations are POST /v1/<operation>").into_response()
}

/// Checks `command` against the current state, then proposes it. Nothing reaches the log
/// unless the check passed; apply checks again against the state the command meets.
async fn check_and_propose<P: ControlPlane>(
    plane: &P,
    command: Command,
) -> Result<Outcome, ApiError> {
    let probe = command.clone();
    plane
        .read(move |state| state.check(&probe))
        .await
        .map_err(ApiError::server)?
        .map_err(ApiError::from)?;
    match plane.propose(command).await.map_err(ApiError::server)? {
        Outcome::Rejected(rejection) => Err(rejection.into()),
        outcome => Ok(outcome),
    }
}

#[cfg(test)]
mod tests;
