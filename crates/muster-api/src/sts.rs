//! STS `GetCallerIdentity` (query protocol, XML answer), so that tools which test a
//! connection with it (Airflow's AWS connection test, for one) work against Muster.

use crate::{ApiError, Principal};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

fn xml(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/xml"));
    response
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub(crate) fn answer(caller: &Principal, body: &[u8], request_id: &str) -> Response {
    let form = String::from_utf8_lossy(body);
    let action = form.split('&').find_map(|kv| kv.strip_prefix("Action="));
    if action != Some("GetCallerIdentity") {
        let e = ApiError::client(format!(
            "Action: only GetCallerIdentity is served (got {})",
            action.unwrap_or("none")
        ));
        return error(&e);
    }
    xml(
        StatusCode::OK,
        format!(
            "<GetCallerIdentityResponse xmlns=\"{NS}\"><GetCallerIdentityResult><Arn>{}</Arn><UserId>{}</UserId><Account>{}</Account></GetCallerIdentityResult><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></GetCallerIdentityResponse>",
            escape(&caller.arn),
            escape(&caller.user_id),
            escape(&caller.account),
            escape(request_id)
        ),
    )
}

pub(crate) fn error(e: &ApiError) -> Response {
    xml(
        e.status,
        format!(
            "<ErrorResponse xmlns=\"{NS}\"><Error><Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error></ErrorResponse>",
            e.code,
            escape(&e.message)
        ),
    )
}
