//! A control node's handle on Raft: propose commands and read the state linearizably from
//! whichever node the request arrived at.

use crate::network::{decode, encode};
use crate::{LoggedCommand, NodeId, PeerDirectory, Raft, StateHandle};
use muster_core::{Command, Outcome, State};
use muster_proto::pb::ReadIndexRequest;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How long a request waits for a leader (an election, a forward) before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a follower waits for the leader to answer one forwarded proposal.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The leader's answer to a forwarded proposal.
#[derive(Serialize, Deserialize)]
pub(crate) enum ForwardedReply {
    Applied(Outcome),
    NotLeader(Option<NodeId>),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader could be reached within {0:?}")]
    NoLeader(Duration),
    #[error("the leader failed the proposal: {0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no leader confirmed a read index within {0:?}")]
    NoLeader(Duration),
    #[error("this node did not catch up with the leader's read index: {0}")]
    Lagging(String),
    #[error("this node's Raft has stopped: {0}")]
    Stopped(String),
}

/// One control node's Raft, with the state it applies and the directory of its peers.
#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    pub state: StateHandle,
    pub peers: PeerDirectory,
}

impl RaftNode {
    /// Commits `command` and returns what applying it produced. A follower forwards it to the
    /// leader; during an election it waits for one.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let command = LoggedCommand::from(command);
        loop {
            let leader = match self.raft.client_write(command.clone()).await {
                Ok(written) => return Ok(written.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => f.leader_id,
                Err(e) => return Err(ProposeError::Failed(e.to_string())),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                match self.forward(leader, &command.0).await {
                    Ok(ForwardedReply::Applied(outcome)) => return Ok(outcome),
                    Ok(ForwardedReply::Failed(e)) => return Err(ProposeError::Failed(e)),
                    // The leader took the command and did not answer in time: it may or may
                    // not have been applied, so the caller decides (every command carries the
                    // ids that make a retry harmless).
                    Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                        return Err(ProposeError::Failed(format!(
                            "the leader did not answer within {FORWARD_TIMEOUT:?}: {}",
                            status.message()
                        )));
                    }
                    // Leadership moved, or the leader is unreachable before the command was
                    // delivered: safe to try again.
                    Ok(ForwardedReply::NotLeader(_)) | Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(ProposeError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        command: &Command,
    ) -> Result<ForwardedReply, tonic::Status> {
        let mut client = self
            .peers
            .raft_client(leader)
            .ok_or_else(|| tonic::Status::unavailable(format!("no address for node {leader}")))?;
        let payload = encode(command).map_err(|e| tonic::Status::internal(e.to_string()))?;
        // Without a deadline, a leader that stalls mid-request would hold this caller (and a
        // batcher behind it, with everything queued there) forever.
        let mut request = tonic::Request::new(payload);
        request.set_timeout(FORWARD_TIMEOUT);
        let reply = client.propose(request).await?;
        decode(reply.get_ref()).map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// A linearizable read: the leader confirms it still leads (read index), this node waits
    /// until it has applied that far, then `f` reads the local state. A deposed leader cannot
    /// confirm, so it never serves a stale read.
    pub async fn read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, ReadError> {
        let index = self.read_index().await?;
        self.raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map_err(|e| ReadError::Lagging(e.to_string()))?;
        Ok(f(&self.state.read().state))
    }

    async fn read_index(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let leader = match self.raft.ensure_linearizable().await {
                Ok(log_id) => return Ok(log_id.map_or(0, |l| l.index)),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    f,
                ))) => f.leader_id,
                // A stopped node will never confirm a read: waiting out the deadline would
                // only hold up shutdown.
                Err(RaftError::Fatal(fatal)) => return Err(ReadError::Stopped(fatal.to_string())),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(
                    _,
                ))) => None,
            };
            if let Some(mut client) = leader
                .filter(|l| *l != self.id)
                .and_then(|l| self.peers.raft_client(l))
                && let Ok(reply) = client.read_index(ReadIndexRequest {}).await
            {
                return Ok(reply.get_ref().index);
            }
            if Instant::now() >= deadline {
                return Err(ReadError::NoLeader(LEADER_WAIT));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The current leader and term as this node sees them.
    pub fn leader(&self) -> (Option<NodeId>, u64) {
        // Borrowed, not cloned: thousands of assignment streams ask this.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        (m.current_leader, m.current_term)
    }

    pub fn is_leader(&self) -> bool {
        self.leader().0 == Some(self.id)
    }
}
