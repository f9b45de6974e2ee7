//! AWS-shaped errors.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_core::Rejection;

/// An error as AWS Batch reports it: a code botocore maps to an exception class, and a
/// message for the user.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    /// `400 ClientException`: the caller can fix this. The message names the field.
    pub fn client(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "ClientException",
            message: message.into(),
        }
    }

    /// `403` with an authentication or authorisation code (`InvalidSignatureException`,
    /// `UnrecognizedClientException`, `AccessDeniedException`, …).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code,
            message: message.into(),
        }
    }

    /// `500 ServerException`: the cluster could not answer (no leader, for example).
    /// Clients retry these, so it is never used for bad input.
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "ServerException",
            message: message.into(),
        }
    }
}

impl From<crate::PlaneError> for ApiError {
    /// A command certainly not taken is `503` (clients send it again); one that may have been
    /// applied is `500 ServerException`, its message saying so.
    fn from(e: crate::PlaneError) -> Self {
        match e {
            crate::PlaneError::Unavailable(message) => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "ServiceUnavailableException",
                message,
            },
            crate::PlaneError::Indeterminate(message) => Self::server(message),
            crate::PlaneError::Refused(message) => Self::client(message),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        ApiError::client(r.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "__type": self.code, "message": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(self.code));
        response
    }
}
