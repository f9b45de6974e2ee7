//! A control node's handle on Raft: propose commands and read the state linearizably from
//! whichever node the request arrived at.

use crate::network::{decode, encode};
use crate::{LoggedCommand, NodeId, PeerDirectory, Raft, StateHandle};
use muster_core::{Command, Outcome, State};
use muster_proto::pb::ReadIndexRequest;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a request waits for a leader (an election, a forward) before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a follower waits for the leader to answer one forwarded proposal.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write handed to this node's Raft is still awaited once this node stopped
/// leading the term it was taken in: long enough for the new leader's first AppendEntries to
/// commit it (the answer comes) or truncate it (`ForwardToLeader`).
const ANSWER_AFTER_DEPOSED: Duration = Duration::from_secs(5);

/// How a write handed to this node's Raft failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node does not lead and did not take the write; the leader it knows of, if any.
    #[error("this node does not lead; the command was not taken")]
    NotLeader(Option<NodeId>),
    /// This node took the write as leader, then dropped it from its log on learning of a newer
    /// leader. That proves nothing: the entry may have reached another node, which may commit
    /// it yet (a snapshot that reaches this node's own entry drops it too).
    #[error(
        "this node stopped leading and dropped the command from its log; it may or may not have been applied"
    )]
    Dropped,
    /// This node stopped leading while it held the write, and Raft never answered.
    #[error(
        "this node stopped leading while it held the command and no answer came; it may or may not have been applied"
    )]
    Unanswered,
    #[error(transparent)]
    Raft(Box<RaftError<NodeId, ClientWriteError<NodeId, crate::Member>>>),
}

impl WriteError {
    /// Where the write was certainly not taken because this node does not lead: the leader it
    /// knows of, if any.
    pub(crate) fn not_leader(&self) -> Option<Option<NodeId>> {
        match self {
            Self::NotLeader(leader) => Some(*leader),
            _ => None,
        }
    }
}

/// Hands `command` to this node's Raft and waits for the answer, but not for good (see
/// [`answered_while_leading`]).
///
/// openraft answers `ForwardToLeader` both when its core refuses the write (it does not lead)
/// and when it drops the entry from its log for a newer leader's; only the first proves that
/// nothing was taken. A node whose metrics showed it leading when it was handed the write may
/// have taken it, so its `ForwardToLeader` is [`WriteError::Dropped`]. (A candidate's is a
/// refusal: counting it as a drop failed writes during every election, the cluster's own
/// founding ones among them. Left open: a candidate that wins between the metrics read and
/// the write's arrival at its core, and is deposed before the entry commits.)
pub(crate) async fn client_write(
    raft: &Raft,
    command: LoggedCommand,
) -> Result<openraft::raft::ClientWriteResponse<crate::TypeConfig>, WriteError> {
    let could_take = raft.server_metrics().borrow().state == openraft::ServerState::Leader;
    match answered_while_leading(raft, raft.client_write(command)).await {
        None => Err(WriteError::Unanswered),
        Some(Ok(written)) => Ok(written),
        Some(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(if could_take {
                WriteError::Dropped
            } else {
                WriteError::NotLeader(f.leader_id)
            })
        }
        Some(Err(e)) => Err(WriteError::Raft(Box::new(e))),
    }
}

/// Awaits `write`, a write handed to this node's Raft (a command, a membership change), until
/// this node learns that another leads (a newer term, or another node named leader) and for
/// [`ANSWER_AFTER_DEPOSED`] after; `None` if no answer came by then.
///
/// openraft 0.9 answers a write when its entry is applied, or with `ForwardToLeader` when a
/// new leader's log truncates it. One way it never answers: a deposed leader that the new
/// leader brings up to date with a snapshot reaching past the end of its log truncates
/// nothing, and keeps the write's responder for good. A leader loop awaiting it (the
/// scheduler's, liveness's) then never ran again, and the cluster placed nothing whenever that
/// node led later.
pub(crate) async fn answered_while_leading<T>(
    raft: &Raft,
    write: impl std::future::Future<Output = T>,
) -> Option<T> {
    // The server metrics change only with the vote, the role and the membership (not with
    // every acknowledgement), so the condition is seldom looked at again.
    let mut metrics = raft.server_metrics();
    let term = metrics.borrow().vote.leader_id().term;
    let deposed = async {
        let _ = metrics
            .wait_for(|m| {
                m.vote.leader_id().term > term || m.current_leader.is_some_and(|l| l != m.id)
            })
            .await;
        tokio::time::sleep(ANSWER_AFTER_DEPOSED).await;
    };
    tokio::select! {
        written = write => Some(written),
        () = deposed => {
            tracing::warn!(
                term,
                waited_after_deposed = ?ANSWER_AFTER_DEPOSED,
                "Raft never answered a write this node took as leader; it may or may not have been applied"
            );
            None
        }
    }
}

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
    /// The leader held the command unanswered until another was elected, and whether it was
    /// taken cannot be told from the state: it may or may not be applied.
    #[error(
        "leader {0} was replaced while it held the command; it may or may not have been applied"
    )]
    Superseded(NodeId),
    /// This node leads without a quorum (cut off from the other control nodes); the command
    /// was not taken.
    #[error("this node leads without a quorum of control nodes; the command was not taken")]
    NoQuorum,
}

/// How a forward to the leader ended.
enum Forwarded {
    Answered(Result<ForwardedReply, tonic::Status>),
    /// This node learned of another leader while the one it forwarded to had not answered.
    Superseded,
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
    /// How this node's pre-votes and elections went (`election::run_elections` counts).
    pub elections: std::sync::Arc<crate::election::ElectionTally>,
    /// Held while this leader hands leadership over: writes and read confirmations wait.
    pub(crate) handover: crate::membership::Handover,
    /// When this node last heard from a leader (its Raft server records it).
    pub contact: crate::election::LeaderContact,
    /// Held by the membership change or handover under way on this leader.
    pub(crate) membership_changes: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The command level this node reports (`muster_core::COMMAND_LEVEL`; lower only in
    /// tests, standing in for a node of an earlier release).
    pub command_level: u32,
}

impl RaftNode {
    pub fn new(id: NodeId, raft: Raft, state: StateHandle, peers: PeerDirectory) -> Self {
        Self {
            id,
            raft,
            state,
            peers,
            elections: Default::default(),
            handover: Default::default(),
            contact: Default::default(),
            membership_changes: Default::default(),
            command_level: muster_core::COMMAND_LEVEL,
        }
    }

    /// What the leader's own loops (scheduler, liveness, housekeeping) write with: this node's
    /// Raft only, never forwarded, held while a handover of leadership is in progress.
    pub async fn write_as_leader(
        &self,
        command: Command,
    ) -> Result<openraft::raft::ClientWriteResponse<crate::TypeConfig>, WriteError> {
        self.handover.wait_until_settled().await;
        client_write(&self.raft, command.into()).await
    }

    /// The handover gate, for this node's Raft server.
    pub fn handover(&self) -> crate::membership::Handover {
        self.handover.clone()
    }

    /// Commits `command` and returns what applying it produced. A follower forwards it to the
    /// leader; during an election it waits for one.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let command = LoggedCommand::from(command);
        // Whether a leader may hold a copy of the command that could still commit: then
        // running out of time is no proof that it was not applied.
        let mut maybe_taken = false;
        loop {
            let leader = match self.write_here(&command).await? {
                Ok(outcome) => return Ok(outcome),
                Err(leader) => leader,
            };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                let answer = match self.forward_until_superseded(leader, &command.0).await {
                    Forwarded::Answered(answer) => answer,
                    // A stalled or cut-off leader: go to the new one at once if proposing
                    // again cannot apply the command twice.
                    Forwarded::Superseded if self.harmless_to_propose_again(&command.0).await => {
                        maybe_taken = true;
                        tracing::info!(
                            leader,
                            "the leader was replaced while it held a forwarded write: taking it to the new one"
                        );
                        continue;
                    }
                    Forwarded::Superseded => return Err(ProposeError::Superseded(leader)),
                };
                match answer {
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
                    // Leadership moved, or no connection to the leader could be made: the
                    // command was not delivered, and is safe to try again.
                    Ok(ForwardedReply::NotLeader(_)) => {}
                    Err(status) if never_sent(&status) => {}
                    // The connection broke after the command went out: the leader may have
                    // taken it (and replicated it before it failed). Again only if that is
                    // harmless.
                    Err(status) => {
                        maybe_taken = true;
                        if !self.harmless_to_propose_again(&command.0).await {
                            return Err(ProposeError::Failed(format!(
                                "the connection to leader {leader} broke while it held the command: {}",
                                status.message()
                            )));
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(if maybe_taken {
                    ProposeError::Failed(format!(
                        "no leader answered within {LEADER_WAIT:?}, and one may hold the command"
                    ))
                } else {
                    ProposeError::NoLeader(LEADER_WAIT)
                });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Forwards `command` to `leader` and waits for its answer, but no longer than until this
    /// node hears of another leader: a leader that was stopped or cut off after the command
    /// reached it would otherwise hold the caller until the forward's deadline, although its
    /// successor was elected within about a second.
    async fn forward_until_superseded(&self, leader: NodeId, command: &Command) -> Forwarded {
        let mut metrics = self.raft.server_metrics();
        let replaced = async move {
            if metrics
                .wait_for(|m| m.current_leader.is_some_and(|l| l != leader))
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            answer = self.forward(leader, command) => Forwarded::Answered(answer),
            () = replaced => Forwarded::Superseded,
        }
    }

    /// Whether proposing `command` again is harmless although a deposed leader may have taken
    /// it. Attempt reports are idempotent. A submit that created none of its jobs had no
    /// effect at all: once the new leader has committed an entry of its term (which a read
    /// index waits for), an entry of the old term that is not applied by then never will be,
    /// since a quorum has moved on to the new term.
    async fn harmless_to_propose_again(&self, command: &Command) -> bool {
        let submitted: Vec<&muster_core::JobId> = match command {
            Command::ReportAttempt { .. } | Command::ReportAttempts { .. } => return true,
            Command::SubmitJob(s) => vec![&s.id],
            Command::SubmitJobs(all) => all.iter().map(|s| &s.id).collect(),
            _ => return false,
        };
        self.read(|state| submitted.iter().all(|id| !state.job_exists(id)))
            .await
            .unwrap_or(false)
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
            // Confirming a read sends heartbeats, which would keep the lease a handover waits
            // out.
            self.handover.wait_until_settled().await;
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

    /// Whether this node leads and a quorum acknowledged it within
    /// [`QUORUM_LEASE`](crate::election::QUORUM_LEASE). A leader cut off from the other
    /// control nodes stays leader in openraft's eyes until it hears of the new term, but past
    /// the lease another may lead: it must no longer act as leader towards agents.
    pub fn leads_with_quorum(&self) -> bool {
        crate::election::leads_with_quorum(&self.raft)
    }

    /// Hands `command` to this node's Raft, unless it leads without a quorum: a new leader is
    /// given until its first heartbeats are answered, and a leader cut off from the quorum is
    /// refused at once (the command is not taken, so the caller may go elsewhere). A command
    /// taken before the quorum was lost fails once the lease has passed without it: it may
    /// yet commit, should the quorum come back, so the caller decides.
    async fn write_here(
        &self,
        command: &LoggedCommand,
    ) -> Result<Result<Outcome, Option<NodeId>>, ProposeError> {
        use crate::election::{HEARTBEAT, QUORUM_LEASE, leads_without_quorum};
        self.handover.wait_until_settled().await;
        let confirm_by = Instant::now() + QUORUM_LEASE;
        while leads_without_quorum(&self.raft) {
            if Instant::now() >= confirm_by {
                return Err(ProposeError::NoQuorum);
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
        let lost_quorum = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if leads_without_quorum(&self.raft) {
                    return;
                }
            }
        };
        tokio::select! {
            written = client_write(&self.raft, command.clone()) => match written {
                Ok(written) => Ok(Ok(written.data)),
                Err(e) => match e.not_leader() {
                    Some(leader) => Ok(Err(leader)),
                    None => Err(ProposeError::Failed(e.to_string())),
                },
            },
            () = lost_quorum => Err(ProposeError::Failed(
                "this leader lost its quorum while the command was in flight; it may or may not be applied".into(),
            )),
        }
    }

    /// [`leads_with_quorum`](Self::leads_with_quorum) as a watch that changes only when the
    /// answer does (checked every heartbeat interval), for the many tasks that act on it.
    pub fn leadership(&self, mut shutdown: watch::Receiver<bool>) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(self.leads_with_quorum());
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(crate::election::HEARTBEAT) => {}
                }
                let leading = node.leads_with_quorum();
                tx.send_if_modified(|was| std::mem::replace(was, leading) != leading);
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }
}

/// Whether a forward failed before the command left this node: no connection to the leader
/// could be made (refused, unreachable, timed out connecting), or no address is known.
fn never_sent(status: &tonic::Status) -> bool {
    use std::error::Error;
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    if status.message().starts_with("no address for node") {
        return true;
    }
    // tonic reports a failed connect as a transport error whose cause is a `ConnectError`.
    let mut source: Option<&dyn Error> = status.source();
    while let Some(e) = source {
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    status.message().contains("tcp connect error")
}

#[cfg(test)]
mod tests {
    use super::never_sent;
    use muster_proto::pb::ReadIndexRequest;
    use muster_proto::pb::raft_service_client::RaftServiceClient;

    #[tokio::test]
    async fn a_refused_connection_is_known_never_to_have_carried_the_command() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{closed}"))
            .unwrap()
            .connect_lazy();
        let status = RaftServiceClient::new(channel)
            .read_index(ReadIndexRequest {})
            .await
            .unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        // A connection that broke under a call may have carried it.
        assert!(!never_sent(&tonic::Status::unavailable(
            "error reading a body from connection: connection reset"
        )));
        assert!(!never_sent(&tonic::Status::unknown("transport error")));
    }
}
