//! `muster-client`: a small typed client for Muster's AWS Batch API, used by the `muster`
//! CLI, the integration tests and benchmarks. It speaks the same REST-JSON as boto3
//! (`POST /v1/<operation>`) and surfaces AWS-shaped errors.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// The API answered with an AWS error (`ClientException`, `ServerException`, …).
    #[error("{code} ({status}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

impl CallError {
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { code, .. } => Some(code),
            CallError::Transport { .. } => None,
        }
    }
}

#[derive(Clone)]
pub struct BatchClient {
    endpoint: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl BatchClient {
    /// `endpoint` like `http://127.0.0.1:7070`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Calls one operation (`"SubmitJob"` or `"submitjob"`) with a JSON body.
    pub async fn call(&self, operation: &str, body: Value) -> Result<Value, CallError> {
        let uri = format!("{}/v1/{}", self.endpoint, operation.to_ascii_lowercase());
        let transport = |message: String| CallError::Transport {
            endpoint: self.endpoint.clone(),
            message,
        };
        let request = hyper::Request::post(&uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| transport(e.to_string()))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = response.status().as_u16();
        let error_type = response
            .headers()
            .get("x-amzn-ErrorType")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let code = error_type
            .or_else(|| {
                value
                    .get("__type")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| status.to_string());
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Err(CallError::Api {
            status,
            code,
            message,
        })
    }
}
