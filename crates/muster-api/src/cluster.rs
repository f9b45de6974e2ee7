//! Who may join the cluster: join tokens and revoked agents, for `muster cluster token …`
//! and `muster cluster node revoke`. Served at `POST /v1/cluster/<operation>`, signed like
//! every call and authorised as `muster:ClusterAdmin`.

use crate::iam::random_lower;
use crate::request::parse;
use crate::{ApiError, ControlPlane, Principal, check_and_propose};
use muster_core::{AccessCommand, Command, JoinToken, NodeId, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};

/// The action every operation here needs.
pub const CLUSTER_ADMIN: &str = "muster:ClusterAdmin";

/// A token lives a day unless asked otherwise, and at most a year.
const DEFAULT_TTL_SECS: u64 = 24 * 3600;
const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClusterRequest {
    ttl_seconds: Option<u64>,
    description: Option<String>,
    id: Option<String>,
    node: Option<String>,
}

fn token_shape(t: &JoinToken, now: Timestamp) -> Value {
    json!({
        "id": t.id,
        "description": t.description,
        "createdAt": t.created_at.as_millis(),
        "expiresAt": t.expires_at.as_millis(),
        "revoked": t.revoked,
        "usable": t.usable_at(now),
    })
}

pub(crate) async fn dispatch<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    operation: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: ClusterRequest = parse(body)?;
    caller.authorize(CLUSTER_ADMIN, &["*"])?;
    let now = plane.now();
    match operation {
        "createjointoken" => {
            let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
            if ttl == 0 || ttl > MAX_TTL_SECS {
                return Err(ApiError::client(format!(
                    "ttlSeconds: must be 1 to {MAX_TTL_SECS}"
                )));
            }
            let (id, secret) = (random_lower(plane, 8), random_lower(plane, 32));
            let token = JoinToken {
                id: id.clone(),
                secret_sha256: muster_sigv4::sha256_hex(secret.as_bytes()),
                created_at: now,
                expires_at: Timestamp(now.as_millis() + ttl * 1000),
                description: req.description.unwrap_or_default(),
                revoked: false,
            };
            let shape = token_shape(&token, now);
            check_and_propose(
                plane,
                Command::Access(AccessCommand::CreateJoinToken(token)),
            )
            .await?;
            // The only time the secret is shown.
            Ok(json!({ "token": format!("{id}.{secret}"), "joinToken": shape }))
        }
        "listjointokens" => {
            let (tokens, revoked) = plane
                .read(move |s| {
                    let tokens: Vec<Value> = s.join_tokens().map(|t| token_shape(t, now)).collect();
                    let revoked: Vec<Value> = s
                        .revoked_agents()
                        .map(|(node, at)| json!({"node": node.0, "revokedAt": at.as_millis()}))
                        .collect();
                    (tokens, revoked)
                })
                .await
                .map_err(ApiError::from)?;
            Ok(json!({ "joinTokens": tokens, "revokedAgents": revoked }))
        }
        "revokejointoken" => {
            let id = req
                .id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ApiError::client("id is required"))?;
            check_and_propose(
                plane,
                Command::Access(AccessCommand::RevokeJoinToken { id }),
            )
            .await?;
            Ok(json!({}))
        }
        "revokeagent" => {
            let node = req
                .node
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ApiError::client("node is required"))?;
            check_and_propose(
                plane,
                Command::Access(AccessCommand::RevokeAgent {
                    node: NodeId(node),
                    at: now,
                }),
            )
            .await?;
            Ok(json!({}))
        }
        other => Err(ApiError::client(format!(
            "cluster operation {other} is not supported"
        ))),
    }
}
