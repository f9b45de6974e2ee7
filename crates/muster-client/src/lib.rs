//! `muster-client`: a small typed client for Muster's AWS Batch API, used by the `muster`
//! CLI, the integration tests and benchmarks. It speaks the same REST-JSON as boto3
//! (`POST /v1/<operation>`), signs every request with SigV4 as botocore does, and surfaces
//! AWS-shaped errors. [`BatchClient::from_environment`] finds the endpoint and credentials
//! the way the aws CLI does.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::path::PathBuf;

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
    #[error("{0}")]
    Config(String),
}

impl CallError {
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An access key pair and the region requests are signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

#[derive(Clone)]
pub struct BatchClient {
    endpoint: String,
    credentials: Credentials,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// `[profile]` values from an AWS shared credentials or config file.
fn ini_value(path: &PathBuf, section: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
        } else if inside
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().to_owned());
        }
    }
    None
}

impl BatchClient {
    /// `endpoint` like `http://127.0.0.1:7070`.
    pub fn new(endpoint: impl Into<String>, credentials: Credentials) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
            credentials,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Endpoint from `endpoint_url`, `AWS_ENDPOINT_URL_BATCH` (or `AWS_ENDPOINT_URL`) or the
    /// profile's `endpoint_url` in the config file;
    /// credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or the shared credentials
    /// file (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`) for `AWS_PROFILE`;
    /// region from `AWS_REGION`, `AWS_DEFAULT_REGION` or the config file, else `us-east-1`.
    pub fn from_environment(endpoint_url: Option<String>) -> Result<Self, CallError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = PathBuf::from(env("HOME").unwrap_or_default());
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or(home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or(home.join(".aws/config"));
        let config_section = if profile == "default" {
            "default".to_owned()
        } else {
            format!("profile {profile}")
        };
        let endpoint = endpoint_url
            .or_else(|| env("AWS_ENDPOINT_URL_BATCH"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| ini_value(&config_file, &config_section, "endpoint_url"))
            .ok_or_else(|| {
                CallError::Config(format!(
                    "no endpoint: set AWS_ENDPOINT_URL_BATCH, pass --endpoint-url, or set \
                     endpoint_url for profile {profile} in {}",
                    config_file.display()
                ))
            })?;
        let (id, secret) = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => (id, secret),
            _ => ini_value(&credentials_file, &profile, "aws_access_key_id")
                .zip(ini_value(
                    &credentials_file,
                    &profile,
                    "aws_secret_access_key",
                ))
                .ok_or_else(|| {
                    CallError::Config(format!(
                        "no credentials for profile {profile} in {}",
                        credentials_file.display()
                    ))
                })?,
        };
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| ini_value(&config_file, &config_section, "region"))
            .unwrap_or_else(|| "us-east-1".into());
        Ok(Self::new(
            endpoint,
            Credentials {
                access_key_id: id,
                secret_access_key: secret,
                region,
            },
        ))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Calls one AWS Batch operation (`"SubmitJob"` or `"submitjob"`) with a JSON body.
    pub async fn call(&self, operation: &str, body: Value) -> Result<Value, CallError> {
        self.post(&format!("/v1/{}", operation.to_ascii_lowercase()), body)
            .await
    }

    /// Calls one IAM administration operation (`"CreateUser"`, …).
    pub async fn call_iam(&self, operation: &str, body: Value) -> Result<Value, CallError> {
        self.post(&format!("/v1/iam/{}", operation.to_ascii_lowercase()), body)
            .await
    }

    /// Calls one of Muster's cluster operations (`"CreateJoinToken"`), at
    /// `POST /v1/cluster/<operation>`.
    pub async fn call_cluster(&self, operation: &str, body: Value) -> Result<Value, CallError> {
        self.post(
            &format!("/v1/cluster/{}", operation.to_ascii_lowercase()),
            body,
        )
        .await
    }

    /// Calls one CloudWatch Logs operation (`"GetLogEvents"`), as `aws logs` does.
    pub async fn call_logs(&self, operation: &str, body: Value) -> Result<Value, CallError> {
        self.send(
            "/",
            body,
            "logs",
            &[
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amz-target", &format!("Logs_20140328.{operation}")),
            ],
        )
        .await
    }

    /// Calls a cluster operation whose answer is a file rather than JSON
    /// (`"SaveSnapshot"`), and writes the answer into `file` as it arrives (it may be far
    /// larger than memory); returns how many bytes were written. An error is answered as
    /// JSON as usual, and then nothing is written.
    pub async fn call_cluster_to_file(
        &self,
        operation: &str,
        body: Value,
        file: &mut tokio::fs::File,
    ) -> Result<u64, CallError> {
        use tokio::io::AsyncWriteExt;
        let path = format!("/v1/cluster/{}", operation.to_ascii_lowercase());
        let response = self
            .request(
                &path,
                body,
                "batch",
                &[("content-type", "application/json")],
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.error_of(response).await);
        }
        let transport = |message: String| CallError::Transport {
            endpoint: self.endpoint.clone(),
            message,
        };
        let mut body = response.into_body();
        let mut written = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| transport(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                file.write_all(&data)
                    .await
                    .map_err(|e| transport(format!("writing the answer: {e}")))?;
                written += data.len() as u64;
            }
        }
        file.flush()
            .await
            .map_err(|e| transport(format!("writing the answer: {e}")))?;
        Ok(written)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, CallError> {
        self.send(path, body, "batch", &[("content-type", "application/json")])
            .await
    }

    async fn send(
        &self,
        path: &str,
        body: Value,
        service: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<Value, CallError> {
        let bytes = self.send_raw(path, body, service, extra_headers).await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Signs and sends one call; the body of a 2xx answer as it is, any other as an error.
    async fn send_raw(
        &self,
        path: &str,
        body: Value,
        service: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<Bytes, CallError> {
        let response = self.request(path, body, service, extra_headers).await?;
        if !response.status().is_success() {
            return Err(self.error_of(response).await);
        }
        Ok(response
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::Transport {
                endpoint: self.endpoint.clone(),
                message: e.to_string(),
            })?
            .to_bytes())
    }

    /// Signs and sends one call; the answer, its body still to be read.
    async fn request(
        &self,
        path: &str,
        body: Value,
        service: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let transport = |message: String| CallError::Transport {
            endpoint: self.endpoint.clone(),
            message,
        };
        let body = Bytes::from(body.to_string());
        let host = self
            .endpoint
            .split("://")
            .nth(1)
            .unwrap_or(&self.endpoint)
            .split('/')
            .next()
            .unwrap_or_default();
        let mut headers: Vec<(String, String)> = extra_headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        headers.push(("host".to_owned(), host.to_owned()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signed = muster_sigv4::sign(
            &muster_sigv4::Request {
                method: "POST",
                path,
                query: "",
                headers: &headers,
                body: &body,
            },
            &self.credentials.access_key_id,
            &self.credentials.secret_access_key,
            &self.credentials.region,
            service,
            &muster_sigv4::format_amz_date(now),
        );
        let mut request = hyper::Request::post(format!("{}{path}", self.endpoint));
        for (name, value) in headers.iter().chain(&signed) {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| transport(e.to_string()))?;
        self.http
            .request(request)
            .await
            .map_err(|e| transport(e.to_string()))
    }

    /// The error a non-2xx answer stands for, from its `x-amzn-ErrorType` and JSON body.
    async fn error_of(&self, response: hyper::Response<hyper::body::Incoming>) -> CallError {
        let status = response.status().as_u16();
        let error_type = response
            .headers()
            .get("x-amzn-ErrorType")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return CallError::Transport {
                    endpoint: self.endpoint.clone(),
                    message: e.to_string(),
                };
            }
        };
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
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
        CallError::Api {
            status,
            code,
            message,
        }
    }
}
