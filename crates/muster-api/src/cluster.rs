//! Operating the cluster: its control nodes (`muster cluster status`, `add-node`,
//! `remove-node`, `transfer-leader`), who may join it (join tokens and revoked agents, for
//! `muster cluster token …` and `muster cluster node revoke|reinstate`), and draining agents
//! (`muster node drain`). Served at `POST /v1/cluster/<operation>`, signed like every call
//! and authorised as `muster:ClusterAdmin`.

use crate::iam::random_lower;
use crate::request::parse;
use crate::{ApiError, ControlPlane, MembershipChange, Principal, check_and_propose};
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
    node_id: Option<u64>,
    raft_addr: Option<String>,
    grpc_addr: Option<String>,
    api_addr: Option<String>,
    catch_up_seconds: Option<u64>,
    to: Option<u64>,
}

fn agent_shape(node: &muster_core::Node) -> Value {
    let status = match node.status {
        muster_core::NodeStatus::Ready => "READY",
        muster_core::NodeStatus::Unhealthy => "UNHEALTHY",
        muster_core::NodeStatus::Lost => "LOST",
    };
    json!({
        "node": node.id.0,
        "computeEnvironment": node.compute_environment,
        "status": status,
        "draining": node.draining,
        "runningAttempts": node.placed_jobs.len(),
        "vcpus": node.inventory.capacity.millicpus as f64 / 1000.0,
        "memoryMiB": node.inventory.capacity.memory_mib,
        "gpus": node.inventory.capacity.gpus,
        "executor": node.inventory.executor,
        "hostname": node.inventory.hostname,
        "unhealthyReason": node.unhealthy_reason,
    })
}

/// How long a new control node may take to catch up unless asked otherwise (a snapshot of
/// millions of jobs takes a while), and at most.
const DEFAULT_CATCH_UP_SECS: u64 = 300;
const MAX_CATCH_UP_SECS: u64 = 3600;

/// A `host:port` address, or a clear error naming `field`.
fn address(field: &str, value: Option<String>) -> Result<String, ApiError> {
    let value = value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::client(format!("{field} is required")))?;
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(value)
        }
        _ => Err(ApiError::client(format!(
            "{field}: {value:?} is not a host:port address"
        ))),
    }
}

fn node_id(value: Option<u64>) -> Result<u64, ApiError> {
    match value {
        Some(id) if id > 0 => Ok(id),
        Some(_) => Err(ApiError::client("nodeId: must be at least 1")),
        None => Err(ApiError::client("nodeId is required")),
    }
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
            let listed = plane
                .read(move |s| {
                    let tokens: Vec<Value> = s.join_tokens().map(|t| token_shape(t, now)).collect();
                    let agents = |list: &mut dyn Iterator<Item = (&NodeId, &Timestamp)>| {
                        list.map(|(node, at)| json!({"node": node.0, "revokedAt": at.as_millis()}))
                            .collect::<Vec<Value>>()
                    };
                    (
                        tokens,
                        agents(&mut s.revoked_agents()),
                        agents(&mut s.reinstated_agents()),
                    )
                })
                .await
                .map_err(ApiError::from)?;
            let (tokens, revoked, reinstated) = listed;
            Ok(json!({ "joinTokens": tokens, "revokedAgents": revoked,
                       "reinstatedAgents": reinstated }))
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
        "revokeagent" | "reinstateagent" => {
            let node = NodeId(
                req.node
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| ApiError::client("node is required"))?,
            );
            let command = if operation == "revokeagent" {
                AccessCommand::RevokeAgent { node, at: now }
            } else {
                crate::require_level(
                    plane,
                    muster_core::LEVEL_REINSTATE_AGENT,
                    "node",
                    "reinstated agents",
                )?;
                AccessCommand::ReinstateAgent { node, at: now }
            };
            check_and_propose(plane, Command::Access(command)).await?;
            Ok(json!({}))
        }
        "status" => {
            let mut status = plane.cluster_status().await?;
            // This node's replica, unconfirmed: status must answer without a quorum too.
            let agents = plane.read_local(|s| {
                let mut by_state = serde_json::Map::new();
                for node in s.nodes() {
                    let shape = agent_shape(node);
                    let state = if node.draining && node.status != muster_core::NodeStatus::Lost {
                        "DRAINING"
                    } else {
                        shape["status"].as_str().unwrap_or_default()
                    };
                    let count = by_state.entry(state.to_owned()).or_insert(json!(0));
                    *count = json!(count.as_u64().unwrap_or(0) + 1);
                }
                Value::Object(by_state)
            });
            status["agents"] = agents;
            Ok(status)
        }
        "addnode" => {
            let catch_up = req.catch_up_seconds.unwrap_or(DEFAULT_CATCH_UP_SECS);
            if catch_up == 0 || catch_up > MAX_CATCH_UP_SECS {
                return Err(ApiError::client(format!(
                    "catchUpSeconds: must be 1 to {MAX_CATCH_UP_SECS}"
                )));
            }
            let change = MembershipChange::AddNode {
                id: node_id(req.node_id)?,
                raft_addr: address("raftAddr", req.raft_addr)?,
                grpc_addr: address("grpcAddr", req.grpc_addr)?,
                api_addr: address("apiAddr", req.api_addr)?,
                catch_up: std::time::Duration::from_secs(catch_up),
            };
            Ok(plane.change_membership(change).await?)
        }
        "removenode" => {
            let change = MembershipChange::RemoveNode {
                id: node_id(req.node_id)?,
            };
            Ok(plane.change_membership(change).await?)
        }
        "listagents" => {
            let agents = plane
                .read(|s| s.nodes().map(agent_shape).collect::<Vec<Value>>())
                .await?;
            Ok(json!({ "agents": agents }))
        }
        "drainagent" | "undrainagent" => {
            let node = req
                .node
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ApiError::client("node is required"))?;
            let draining = operation == "drainagent";
            check_and_propose(
                plane,
                Command::Admin(muster_core::AdminCommand::DrainNode {
                    node: NodeId(node.clone()),
                    draining,
                }),
            )
            .await?;
            let agent = plane
                .read(move |s| s.node(&NodeId(node)).map(agent_shape))
                .await?;
            Ok(json!({ "agent": agent }))
        }
        "transferleader" => {
            if req.to == Some(0) {
                return Err(ApiError::client("to: must be at least 1"));
            }
            let change = MembershipChange::TransferLeader { to: req.to };
            Ok(plane.change_membership(change).await?)
        }
        other => Err(ApiError::client(format!(
            "cluster operation {other} is not supported"
        ))),
    }
}
