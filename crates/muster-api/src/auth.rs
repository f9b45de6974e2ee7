//! Who is calling: SigV4 verification against the access keys in the replicated state, and
//! IAM policy checks before anything is proposed.

use crate::{ApiError, ControlPlane};
use muster_core::{Decision, KeyStatus, Policy, evaluate};
use muster_sigv4::{Request, parse_authorization, verify};

/// How far a request's `X-Amz-Date` may be from this node's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;

/// An authenticated caller and the policies that decide what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: String,
    pub user_id: String,
    pub arn: String,
    pub account: String,
    policies: Vec<Policy>,
}

impl Principal {
    /// Fails with `403 AccessDeniedException` unless every resource is allowed for `action`
    /// and none is explicitly denied.
    pub fn authorize(&self, action: &str, resources: &[&str]) -> Result<(), ApiError> {
        for resource in resources {
            if evaluate(&self.policies, action, resource) != Decision::Allow {
                return Err(ApiError::forbidden(
                    "AccessDeniedException",
                    format!(
                        "User: {} is not authorized to perform: {action} on resource: {resource}",
                        self.arn
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The parts of an HTTP request SigV4 covers.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

/// Verifies the request's signature for `service` in `region`. Every failure is a 403 with
/// the code AWS uses for it.
pub async fn authenticate<P: ControlPlane>(
    plane: &P,
    req: &SignedRequest<'_>,
    service: &str,
    region: &str,
) -> Result<Principal, ApiError> {
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let Some(authorization) = header("authorization") else {
        return Err(ApiError::forbidden(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let auth = parse_authorization(authorization)
        .map_err(|e| ApiError::forbidden("IncompleteSignatureException", e.to_string()))?;
    let amz_date = header("x-amz-date").ok_or_else(|| {
        ApiError::forbidden(
            "IncompleteSignatureException",
            "X-Amz-Date header is missing",
        )
    })?;
    let signed_at = muster_sigv4::parse_amz_date(amz_date).ok_or_else(|| {
        ApiError::forbidden(
            "IncompleteSignatureException",
            format!("X-Amz-Date {amz_date} is not YYYYMMDDTHHMMSSZ"),
        )
    })?;
    let now = plane.now().as_millis() / 1000;
    if now.abs_diff(signed_at) > MAX_CLOCK_SKEW_SECS {
        return Err(ApiError::forbidden(
            "InvalidSignatureException",
            format!(
                "Signature expired: {amz_date} is more than 5 minutes away from the server's time"
            ),
        ));
    }
    if !amz_date.starts_with(&auth.date) {
        return Err(ApiError::forbidden(
            "InvalidSignatureException",
            "credential scope date does not match X-Amz-Date",
        ));
    }
    if auth.service != service {
        return Err(ApiError::forbidden(
            "InvalidSignatureException",
            format!("credential should be scoped to correct service: '{service}'"),
        ));
    }
    if auth.region != region {
        return Err(ApiError::forbidden(
            "InvalidSignatureException",
            format!(
                "credential should be scoped to a valid region, not '{}'; this cluster is '{region}'",
                auth.region
            ),
        ));
    }
    let id = auth.access_key_id.clone();
    let lookup = move |s: &muster_core::State| {
        let key = s
            .access_key(&id)
            .filter(|k| k.status == KeyStatus::Active)?;
        let user = s.user(&key.user)?;
        Some((
            key.secret.clone(),
            Principal {
                user: user.name.clone(),
                user_id: user.user_id.clone(),
                arn: user.arn.clone(),
                account: s.arn_scope().account.clone(),
                policies: user.policies.values().cloned().collect(),
            },
        ))
    };
    // The local replica answers almost always; a key created a moment ago may not have
    // reached it yet, so a miss is asked again linearizably.
    let found = match plane.read_local(lookup.clone()) {
        Some(found) => Some(found),
        None => plane.read(lookup).await.map_err(ApiError::from)?,
    };
    let Some((secret, principal)) = found else {
        return Err(ApiError::forbidden(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    };
    let request = Request {
        method: req.method,
        path: req.path,
        query: req.query,
        headers: &req.headers,
        body: req.body,
    };
    verify(&request, &auth, amz_date, &secret)
        .map_err(|e| ApiError::forbidden("InvalidSignatureException", e.to_string()))?;
    Ok(principal)
}
