//! Administration of users, access keys and inline policies, shaped like `aws iam` (JSON
//! bodies and answers with IAM's member names). Served at `POST /v1/iam/<operation>`, signed
//! like every other call and authorised as `iam:<Operation>` on the user's ARN.

use crate::request::parse;
use crate::{ApiError, ControlPlane, Principal, check_and_propose};
use muster_core::{AccessKey, Command, IamCommand, Policy, User};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct IamRequest {
    user_name: Option<String>,
    policy_name: Option<String>,
    policy_document: Option<String>,
    access_key_id: Option<String>,
}

fn required<'a>(field: &str, value: &'a Option<String>) -> Result<&'a str, ApiError> {
    value
        .as_deref()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::client(format!("{field} is required")))
}

fn create_date(ms: u64) -> String {
    muster_sigv4::iso8601(ms / 1000)
}

fn user_shape(u: &User) -> Value {
    json!({"UserName": u.name, "UserId": u.user_id, "Arn": u.arn, "Path": "/", "CreateDate": create_date(u.created_at.as_millis())})
}

fn key_metadata(k: &AccessKey) -> Value {
    json!({"UserName": k.user, "AccessKeyId": k.id, "Status": "Active", "CreateDate": create_date(k.created_at.as_millis())})
}

/// Random upper-case letters and digits for key and user ids, from the node's UUIDs.
fn random_token<P: ControlPlane>(plane: &P, len: usize) -> String {
    random_lower(plane, len).to_ascii_uppercase()
}

/// Random lower-case letters and digits (hex) from the node's UUIDs.
pub(crate) fn random_lower<P: ControlPlane>(plane: &P, len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        out.extend(
            plane
                .new_id()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase()),
        );
    }
    out.truncate(len);
    out
}

pub(crate) async fn dispatch<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    operation: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: IamRequest = parse(body)?;
    let action = match operation {
        "createuser" => "iam:CreateUser",
        "deleteuser" => "iam:DeleteUser",
        "listusers" => "iam:ListUsers",
        "createaccesskey" => "iam:CreateAccessKey",
        "listaccesskeys" => "iam:ListAccessKeys",
        "deleteaccesskey" => "iam:DeleteAccessKey",
        "putuserpolicy" => "iam:PutUserPolicy",
        "getuserpolicy" => "iam:GetUserPolicy",
        "listuserpolicies" => "iam:ListUserPolicies",
        "deleteuserpolicy" => "iam:DeleteUserPolicy",
        other => {
            return Err(ApiError::client(format!(
                "IAM operation {other} is not supported"
            )));
        }
    };
    if operation == "listusers" {
        caller.authorize(
            action,
            &[&format!("arn:aws:iam::{}:user/*", caller.account)],
        )?;
        let users = plane
            .read(|s| s.users().map(user_shape).collect::<Vec<_>>())
            .await
            .map_err(ApiError::from)?;
        return Ok(json!({ "Users": users }));
    }
    let user = required("UserName", &req.user_name)?.to_owned();
    caller.authorize(
        action,
        &[&format!("arn:aws:iam::{}:user/{user}", caller.account)],
    )?;
    let iam = |cmd| Command::Iam(cmd);
    match operation {
        "createuser" => {
            let id = format!("AIDA{}", random_token(plane, 17));
            check_and_propose(
                plane,
                iam(IamCommand::CreateUser {
                    name: user.clone(),
                    user_id: id,
                    at: plane.now(),
                }),
            )
            .await?;
            let shape = plane
                .read(move |s| s.user(&user).map(user_shape))
                .await
                .map_err(ApiError::from)?;
            Ok(json!({ "User": shape }))
        }
        "deleteuser" => {
            check_and_propose(plane, iam(IamCommand::DeleteUser { name: user })).await?;
            Ok(json!({}))
        }
        "createaccesskey" => {
            let id = format!("AKIA{}", random_token(plane, 16));
            let secret: String = random_token(plane, 40);
            let at = plane.now();
            check_and_propose(
                plane,
                iam(IamCommand::CreateAccessKey {
                    user: user.clone(),
                    id: id.clone(),
                    secret: secret.clone(),
                    at,
                }),
            )
            .await?;
            // The only time the secret is ever returned.
            Ok(
                json!({"AccessKey": {"UserName": user, "AccessKeyId": id, "SecretAccessKey": secret,
                                    "Status": "Active", "CreateDate": create_date(at.as_millis())}}),
            )
        }
        "listaccesskeys" => {
            let keys = plane
                .read(move |s| {
                    s.user(&user).map(|_| {
                        s.access_keys_of(&user)
                            .map(key_metadata)
                            .collect::<Vec<_>>()
                    })
                })
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::client("UserName: no such user"))?;
            Ok(json!({ "AccessKeyMetadata": keys }))
        }
        "deleteaccesskey" => {
            let id = required("AccessKeyId", &req.access_key_id)?.to_owned();
            check_and_propose(plane, iam(IamCommand::DeleteAccessKey { user, id })).await?;
            Ok(json!({}))
        }
        "putuserpolicy" => {
            let policy_name = required("PolicyName", &req.policy_name)?.to_owned();
            let policy =
                Policy::parse(required("PolicyDocument", &req.policy_document)?).map_err(|r| {
                    ApiError::client(r.message.replacen("policyDocument", "PolicyDocument", 1))
                })?;
            check_and_propose(
                plane,
                iam(IamCommand::PutUserPolicy {
                    user,
                    policy_name,
                    policy,
                }),
            )
            .await?;
            Ok(json!({}))
        }
        "getuserpolicy" => {
            let policy_name = required("PolicyName", &req.policy_name)?.to_owned();
            let name = policy_name.clone();
            let found = plane
                .read(move |s| {
                    s.user(&user).and_then(|u| {
                        u.policies
                            .get(&name)
                            .map(|p| (u.name.clone(), p.document.clone()))
                    })
                })
                .await
                .map_err(ApiError::from)?;
            let (user, document) = found
                .ok_or_else(|| ApiError::client("PolicyName: no such policy for this user"))?;
            Ok(json!({"UserName": user, "PolicyName": policy_name, "PolicyDocument": document}))
        }
        "listuserpolicies" => {
            let names = plane
                .read(move |s| {
                    s.user(&user)
                        .map(|u| u.policies.keys().cloned().collect::<Vec<_>>())
                })
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::client("UserName: no such user"))?;
            Ok(json!({ "PolicyNames": names }))
        }
        "deleteuserpolicy" => {
            let policy_name = required("PolicyName", &req.policy_name)?.to_owned();
            check_and_propose(
                plane,
                iam(IamCommand::DeleteUserPolicy { user, policy_name }),
            )
            .await?;
            Ok(json!({}))
        }
        _ => unreachable!("every operation was matched above"),
    }
}
