//! The Raft gRPC server each control node runs for its peers.

use crate::LoggedCommand;
use crate::Raft;
use crate::RaftNode;
use crate::election::{LeaderContact, PreVoteRequest, answer_pre_vote};
use crate::membership::{AdminRequest, Handover};
use crate::network::{decode, decode_snapshot_chunk, encode};
use crate::node::ForwardedReply;
use muster_proto::pb::raft_service_server::RaftService;
use muster_proto::pb::{RaftPayload, ReadIndexReply, ReadIndexRequest};
use openraft::raft::AppendEntriesResponse;
use tonic::{Request, Response, Status};

pub struct RaftGrpc {
    raft: Raft,
    /// For membership changes and reports (`Admin`).
    node: RaftNode,
    /// Forwarded writes and read confirmations wait while this leader hands over.
    handover: Handover,
    /// Touched whenever the leader's AppendEntries or snapshot is accepted here.
    contact: LeaderContact,
    /// Every call must come from a control node's certificate (TLS on).
    control_nodes_only: bool,
}

impl RaftGrpc {
    pub fn new(node: RaftNode) -> Self {
        Self {
            raft: node.raft.clone(),
            handover: node.handover(),
            contact: node.contact.clone(),
            node,
            control_nodes_only: false,
        }
    }

    /// Refuses every call whose client certificate is not a control node's: an agent's
    /// certificate is of the same CA, and must not vote, append or propose.
    pub fn control_nodes_only(mut self) -> Self {
        self.control_nodes_only = true;
        self
    }

    fn authorize<T>(&self, request: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        if !self.control_nodes_only {
            return Ok(());
        }
        let refuse = |why: String| {
            let peer = request.remote_addr();
            tracing::warn!(rpc, ?peer, why, "Raft call refused");
            why
        };
        match muster_tls::peer_role(request) {
            Ok(muster_tls::Role::Control(_)) => Ok(()),
            Ok(role) => Err(Status::permission_denied(refuse(format!(
                "{role} may not call the Raft RPC {rpc}: only control nodes may"
            )))),
            Err(status) => Err(Status::unauthenticated(refuse(status.message().to_owned()))),
        }
    }
}

fn bad_payload(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("cannot encode reply: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "append_entries")?;
        let rpc = decode(request.get_ref()).map_err(bad_payload)?;
        let answer = self.raft.append_entries(rpc).await;
        // Accepted (or merely behind): the sender leads this node's term. A higher vote
        // refuses a deposed leader, which is no contact.
        if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.contact.touch();
        }
        reply(&answer)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "vote")?;
        let rpc = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "install_snapshot")?;
        let rpc = decode_snapshot_chunk(request.into_inner()).map_err(bad_payload)?;
        let answer = self.raft.install_snapshot(rpc).await;
        if answer.is_ok() {
            self.contact.touch();
        }
        reply(&answer)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "pre_vote")?;
        let ask: PreVoteRequest = decode(request.get_ref()).map_err(bad_payload)?;
        let answer = answer_pre_vote(&self.raft, &self.contact, &ask);
        if !answer.granted {
            tracing::debug!(candidate = ask.candidate, term = ask.term, why = ?answer.refused_because, "pre-vote refused");
        }
        reply(&answer)
    }

    async fn propose(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "propose")?;
        let command: LoggedCommand = decode(request.get_ref()).map_err(bad_payload)?;
        // Handing leadership over: not taken, so that the sender goes to the next leader
        // rather than wait here and be unsure whether it was applied.
        if self.handover.in_progress() {
            return reply(&ForwardedReply::NotLeader(None));
        }
        // A leader shutting down stops Raft before its servers: a command arriving then was
        // never taken, so the sender may safely take it to the next leader. (One taken and
        // then cut off by the stop is `Failed`: it may yet commit, and the caller decides.)
        if self.raft.metrics().borrow().running_state.is_err() {
            return reply(&ForwardedReply::NotLeader(None));
        }
        // Nor is one taken by a leader cut off from the quorum: it could not commit it, and
        // another leader may already be elected.
        if crate::election::leads_without_quorum(&self.raft) {
            return reply(&ForwardedReply::NotLeader(None));
        }
        let answer = match crate::node::client_write(&self.raft, command).await {
            Ok(written) => ForwardedReply::Applied(written.data),
            Err(e) => match e.not_leader() {
                Some(leader) => ForwardedReply::NotLeader(leader),
                None => ForwardedReply::Failed(e.to_string()),
            },
        };
        reply(&answer)
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        self.authorize(&request, "read_index")?;
        if self.handover.in_progress() {
            return Err(Status::failed_precondition(
                "this leader is handing leadership over",
            ));
        }
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(Response::new(ReadIndexReply {
                index: log_id.map_or(0, |l| l.index),
            })),
            Err(e) => Err(Status::failed_precondition(format!("not the leader: {e}"))),
        }
    }

    async fn admin(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.authorize(&request, "admin")?;
        let ask: AdminRequest = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.node.serve_admin(ask).await)
    }
}
