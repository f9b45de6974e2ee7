//! AgentService: how worker agents join, learn what to run, and report.

use crate::batcher::{BatchLimits, Batcher};
use muster_core::{AttemptEvent, AttemptReport as Report, Command, JobId, NodeId, Outcome};
use muster_proto::pb::agent_service_server::AgentService;
use muster_proto::pb::{
    AssignmentSet, AttemptKey, AttemptReport, AttemptReports, HeartbeatReply, HeartbeatRequest,
    JoinReply, JoinRequest, RegisterReply, RegisterRequest, RenewRequest, ReportReply,
    WatchRequest, attempt_report,
};
use muster_proto::{LEADER_METADATA_KEY, assignment_to_pb, inventory_from_pb};
use muster_raft::RaftNode;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How often an unchanged assignment set is sent again, so that a silent stream is noticed.
const RESEND: Duration = Duration::from_secs(5);

/// How long a watch that arrives during an election waits for a leader to be known.
const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Over how long the watches held during an election are let go; see
/// [`AgentGateway::wait_for_a_leader`].
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// Where in [`RECONNECT_SPREAD`] `agent`'s held watch is let go: fixed per agent, spread
/// evenly over a fleet.
fn reconnect_delay(agent: &NodeId) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    agent.hash(&mut hasher);
    let spread = RECONNECT_SPREAD.as_millis() as u64;
    Duration::from_millis(hasher.finish() % spread)
}

/// Most reports committed as one entry (each is small and of bounded size).
const REPORT_BATCH: BatchLimits = BatchLimits {
    // Small enough that an entry reaches a loaded follower within one heartbeat interval.
    items: 1024,
    bytes: usize::MAX,
    in_flight: 4,
};

pub struct AgentGateway {
    node: RaftNode,
    shutdown: watch::Receiver<bool>,
    /// Whether this node leads with a quorum (`RaftNode::leadership`): streams end, and
    /// watches are refused, when it does not.
    leading: watch::Receiver<bool>,
    heartbeats: crate::liveness::Heartbeats,
    /// Told to agents in every heartbeat answer, so that they stop their attempts in time.
    node_lost_after: Duration,
    /// Reports are committed in batches: thousands of agents each reporting every attempt
    /// twice would otherwise cost one Raft entry per report.
    reports: Batcher<Report>,
    /// Every call must come with an agent's certificate, and act only for that agent (TLS on).
    authenticating: bool,
    /// Signs the certificates of agents that join with a token; `None`: this node cannot.
    ca: Option<std::sync::Arc<muster_tls::pki::ClusterCa>>,
}

/// The certificate of agent `node` for the key of `csr_pem`, and the CA's, as a joining or
/// renewing agent gets them.
fn sign_agent(
    ca: &muster_tls::pki::ClusterCa,
    csr_pem: &str,
    node: &str,
) -> Result<JoinReply, Status> {
    let certificate_pem = ca
        .sign_request(
            csr_pem,
            &muster_tls::Role::Agent(node.to_owned()),
            muster_tls::pki::Validity::from_now(AGENT_CERT_VALIDITY),
        )
        .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
    Ok(JoinReply {
        certificate_pem,
        ca_pem: ca.cert_pem().to_owned(),
    })
}

/// How long a joined agent's certificate is valid.
pub const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

impl AgentGateway {
    pub fn new(
        node: RaftNode,
        shutdown: watch::Receiver<bool>,
        heartbeats: crate::liveness::Heartbeats,
        node_lost_after: Duration,
    ) -> Self {
        Self {
            leading: node.leadership(shutdown.clone()),
            reports: Batcher::spawn(node.clone(), "reports", REPORT_BATCH, |reports| {
                Command::ReportAttempts {
                    reports,
                    at: crate::now_millis(),
                }
            }),
            node,
            shutdown,
            heartbeats,
            node_lost_after,
            authenticating: false,
            ca: None,
        }
    }

    /// Agents that present a valid join token get their certificates signed by `ca`.
    pub fn signing_joins_with(
        mut self,
        ca: Option<std::sync::Arc<muster_tls::pki::ClusterCa>>,
    ) -> Self {
        self.ca = ca;
        self
    }

    /// With `on`, a call is served only for the agent its client certificate names: an agent
    /// registers, beats, watches and reports for itself alone, and a control node's or no
    /// certificate is refused.
    pub fn authenticating_agents(mut self, on: bool) -> Self {
        self.authenticating = on;
        self
    }

    /// Refuses `request` unless it comes from agent `node` (when authenticating).
    fn authorize<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        node: &str,
    ) -> Result<(), Status> {
        if !self.authenticating {
            return Ok(());
        }
        let refused = match muster_tls::peer_role(request) {
            Ok(muster_tls::Role::Agent(name)) if name == node => {
                let issued_at = || {
                    let at = muster_tls::peer_issued_at(request)?;
                    let millis = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
                    Some(muster_core::Timestamp(u64::try_from(millis).ok()?))
                };
                let applied = self.node.state.read();
                let state = &applied.state;
                let node_id = NodeId(name);
                if !state.agent_certificate_refused(&node_id, issued_at) {
                    return Ok(());
                }
                if state.agent_revoked(&node_id) {
                    Status::permission_denied(format!("agent {node} was revoked"))
                } else {
                    Status::permission_denied(format!(
                        "agent {node} was reinstated after a revocation: its certificates from \
                         before the revocation are refused (delete the agent's work_dir/tls and \
                         start it with a join token)"
                    ))
                }
            }
            Ok(muster_tls::Role::Agent(name)) => Status::permission_denied(format!(
                "the certificate of agent {name} cannot act for node {node:?}"
            )),
            Ok(role) => {
                Status::permission_denied(format!("{role} may not call {rpc}: only agents may"))
            }
            Err(status) => status,
        };
        tracing::warn!(rpc, peer = ?request.remote_addr(), why = refused.message(), "agent call refused");
        Err(refused)
    }

    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        match self.node.propose(command).await {
            Ok(Outcome::Rejected(r)) => Err(Status::invalid_argument(r.message)),
            Ok(outcome) => Ok(outcome),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// While an election runs no node can name the leader. A watch arriving then is held
    /// until one is known (or [`LEADER_WAIT`] passes) rather than refused at once: after a
    /// leader fails, every agent of the fleet calls within milliseconds, and answered at once
    /// they would only call again and again while the election needs the CPU.
    ///
    /// Once the leader is known, the held watches are let go over [`RECONNECT_SPREAD`], each
    /// at a moment drawn from its agent's id: let go together, ten thousand agents reach the
    /// new leader in the same instant, and its first commits (the next placement among them)
    /// waited a second behind them.
    ///
    /// A node that has just been elected is confirmed by its first round of heartbeats, and a
    /// watch arriving before that waits for it; a leader cut off from the quorum never is.
    async fn wait_for_a_leader(&self, agent: &NodeId) {
        let mut metrics = self.node.raft.server_metrics();
        if metrics.borrow().current_leader.is_none() {
            let known = metrics.wait_for(|m| m.current_leader.is_some());
            if tokio::time::timeout(LEADER_WAIT, known).await.is_err() {
                return;
            }
            tokio::time::sleep(reconnect_delay(agent)).await;
        }
        if self.node.is_leader() {
            let mut leading = self.leading.clone();
            let confirmed = leading.wait_for(|l| *l);
            let _ = tokio::time::timeout(muster_raft::election::QUORUM_LEASE, confirmed).await;
        }
    }

    fn not_leader(&self) -> Status {
        let mut status = Status::failed_precondition(
            "this control node is not the leader, or leads without a quorum",
        );
        if let Some(addr) = self
            .node
            .leader()
            .0
            .filter(|l| *l != self.node.id)
            .and_then(|l| self.node.peers.agent_addr(l))
            && let Ok(v) = addr.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA_KEY, v);
        }
        status
    }

    /// What a heartbeat is answered with: whether this node's answer is contact with the
    /// cluster (it leads with a quorum), and who leads as far as it knows.
    fn heartbeat_reply(&self) -> HeartbeatReply {
        let (leader, term) = self.node.leader();
        HeartbeatReply {
            leading: self.node.leads_with_quorum(),
            term,
            leader_address: leader.and_then(|l| self.node.peers.agent_addr(l)),
            node_lost_after_ms: self.node_lost_after.as_millis() as u64,
            control_plane: self.node.voters_agent_addrs(),
        }
    }
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<AssignmentSet, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentGateway {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        self.authorize(&request, "Register", &request.get_ref().node_id)?;
        let req = request.into_inner();
        let inventory = req
            .inventory
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("inventory is required"))?;
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let node = NodeId(req.node_id.clone());
        self.heartbeats.record(&node);
        let inventory = inventory_from_pb(inventory);
        // An agent that registers again, unchanged and still ready, needs no write: after a
        // failover or a restart of many agents, thousands do this at once, and each write
        // would be a Raft entry. This node's replica may lag the leader's; should the leader
        // have marked the node lost meanwhile, the agent's next heartbeat there is refused
        // and it registers again.
        let unchanged = {
            let applied = self.node.state.read();
            applied.state.node(&node).is_some_and(|n| {
                n.status == muster_core::NodeStatus::Ready
                    && n.compute_environment == req.compute_environment
                    && n.inventory == inventory
            })
        };
        if unchanged {
            return Ok(Response::new(RegisterReply {}));
        }
        self.propose(Command::RegisterNode {
            node: NodeId(req.node_id),
            compute_environment: req.compute_environment,
            inventory,
            at: crate::now_millis(),
        })
        .await?;
        Ok(Response::new(RegisterReply {}))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.authorize(&request, "Heartbeat", &request.get_ref().node_id)?;
        // A heartbeat keeps the node alive (see `liveness`) and its inventory current.
        let req = request.into_inner();
        let node = NodeId(req.node_id);
        self.heartbeats.record(&node);
        let reported = req.inventory.as_ref().map(inventory_from_pb);
        let known = {
            let applied = self.node.state.read();
            applied
                .state
                .node(&node)
                .filter(|n| n.status != muster_core::NodeStatus::Lost)
                .map(|n| {
                    (
                        n.compute_environment.clone(),
                        n.inventory.clone(),
                        n.unhealthy_reason.clone(),
                    )
                })
        };
        let Some((compute_environment, inventory, unhealthy)) = known else {
            // Unknown or lost: the agent registers again.
            return Err(Status::not_found(format!("node {node} is not registered")));
        };
        if req.unhealthy != unhealthy {
            self.propose(Command::NodeHealth {
                node: node.clone(),
                unhealthy: req.unhealthy.clone(),
                at: crate::now_millis(),
            })
            .await?;
        }
        if let Some(reported) = reported.filter(|r| *r != inventory) {
            self.propose(Command::RegisterNode {
                node,
                compute_environment,
                inventory: reported,
                at: crate::now_millis(),
            })
            .await?;
        }
        Ok(Response::new(self.heartbeat_reply()))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        self.authorize(&request, "WatchAssignments", &request.get_ref().node_id)?;
        let node_id = NodeId(request.into_inner().node_id);
        if !*self.leading.borrow() {
            self.wait_for_a_leader(&node_id).await;
            if !*self.leading.borrow() {
                return Err(self.not_leader());
            }
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_assignments(
            self.node.clone(),
            node_id,
            tx,
            self.leading.clone(),
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        // No certificate is asked for: the token is the credential, and it is checked on a
        // linearizable read, so a revocation that committed is never missed. Nothing is
        // written: the agent registers afterwards with its certificate, so a join that fails
        // leaves no node behind.
        let peer = request.remote_addr();
        let req = request.into_inner();
        let Some(ca) = self.ca.clone() else {
            return Err(Status::failed_precondition(
                "this control node holds no CA key (tls.ca_key_file) and cannot sign; join through another",
            ));
        };
        if let Err(why) = muster_core::validate::node_name(&req.node_id) {
            return Err(Status::invalid_argument(format!("node_id: {why}")));
        }
        let refuse = |status: Status| {
            tracing::warn!(?peer, node = %req.node_id, why = status.message(), "join refused");
            status
        };
        let Some((id, secret)) = req.token.split_once('.') else {
            return Err(refuse(Status::unauthenticated(
                "the join token is malformed: it is <id>.<secret>",
            )));
        };
        let (id, digest, now) = (
            id.to_owned(),
            muster_sigv4::sha256_hex(secret.as_bytes()),
            crate::now_millis(),
        );
        let node = NodeId(req.node_id.clone());
        let verdict = self
            .node
            .read(move |s| {
                // The token first: without it, nothing is said about any name.
                match s.join_token(&id) {
                    Some(t) if t.secret_sha256 != digest => {
                        return Err(Status::unauthenticated("the join token is wrong"));
                    }
                    Some(t) if t.revoked => {
                        return Err(Status::permission_denied(format!(
                            "the join token {id} was revoked"
                        )));
                    }
                    Some(t) if now >= t.expires_at => {
                        return Err(Status::permission_denied(format!(
                            "the join token {id} has expired"
                        )));
                    }
                    Some(_) => {}
                    // A cluster that never had a token is being founded (its founder records
                    // the token `muster cluster init` made a moment after it starts): an agent
                    // started beside it waits, as for a node it cannot reach yet. (One whose
                    // tokens all expired and were forgotten refuses at once.)
                    None if !s.ever_had_join_tokens() => {
                        return Err(Status::unavailable(
                            "the cluster knows no join token yet (it is being founded); try again",
                        ));
                    }
                    None => return Err(Status::unauthenticated("the join token is wrong")),
                }
                if s.agent_revoked(&node) {
                    return Err(Status::permission_denied(format!(
                        "agent {node} was revoked and cannot join again under that name unless reinstated"
                    )));
                }
                // A token is shared by a fleet: it must not let one machine take the name
                // (and so the assignments) of another that is alive. A machine that lost its
                // certificate joins again once its old self is marked lost.
                if s.node(&node)
                    .is_some_and(|n| n.status != muster_core::NodeStatus::Lost)
                {
                    return Err(Status::already_exists(format!(
                        "node {node} is registered and alive: a joining agent cannot take its \
                         name (pick another node_id, or wait until the old one is marked lost)"
                    )));
                }
                Ok(())
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        verdict.map_err(refuse)?;
        let reply = sign_agent(&ca, &req.csr_pem, &req.node_id)?;
        tracing::info!(node = %req.node_id, ?peer, "agent joined");
        Ok(Response::new(reply))
    }

    async fn renew_certificate(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<JoinReply>, Status> {
        // The agent's current certificate (not revoked) is the credential.
        self.authorize(&request, "RenewCertificate", &request.get_ref().node_id)?;
        if !self.authenticating {
            return Err(Status::failed_precondition("this cluster runs without TLS"));
        }
        let req = request.into_inner();
        let Some(ca) = self.ca.clone() else {
            return Err(Status::failed_precondition(
                "this control node holds no CA key (tls.ca_key_file) and cannot sign; renew through another",
            ));
        };
        let reply = sign_agent(&ca, &req.csr_pem, &req.node_id)?;
        tracing::info!(node = %req.node_id, "agent certificate renewed");
        Ok(Response::new(reply))
    }

    async fn report_attempts(
        &self,
        request: Request<AttemptReports>,
    ) -> Result<Response<ReportReply>, Status> {
        // Reports for attempts of another node are refused here; the state machine refuses
        // a report for an attempt not placed on the node it names.
        if self.authenticating {
            let mut nodes: std::collections::BTreeSet<&str> = request
                .get_ref()
                .reports
                .iter()
                .map(|r| r.node_id.as_str())
                .collect();
            if nodes.is_empty() {
                // Even an empty batch comes from an agent, or is refused.
                let role = muster_tls::peer_role(&request)?;
                let muster_tls::Role::Agent(_) = role else {
                    return Err(Status::permission_denied(format!(
                        "{role} may not call ReportAttempts: only agents may"
                    )));
                };
                nodes.clear();
            }
            for node in nodes {
                self.authorize(&request, "ReportAttempts", node)?;
            }
        }
        let reports = request
            .into_inner()
            .reports
            .into_iter()
            .map(report_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        if reports.is_empty() {
            // Nothing to commit: an empty entry would only lengthen the log.
            return Ok(Response::new(ReportReply {}));
        }
        if reports.len() > REPORT_BATCH.items {
            return Err(Status::invalid_argument(format!(
                "reports: at most {} in one call, got {}",
                REPORT_BATCH.items,
                reports.len()
            )));
        }
        // One group, so the reports go into the log together and in the order sent: a
        // RUNNING is never applied after the same attempt's exit.
        let outcomes = self
            .reports
            .commit_in_order(reports, 0)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if let Some(Outcome::Rejected(r)) =
            outcomes.iter().find(|o| matches!(o, Outcome::Rejected(_)))
        {
            return Err(Status::unavailable(r.message.clone()));
        }
        Ok(Response::new(ReportReply {}))
    }
}

fn report_from_pb(report: AttemptReport) -> Result<Report, Status> {
    let event = match report.event {
        Some(attempt_report::Event::Running(_)) => AttemptEvent::Running,
        Some(attempt_report::Event::Exited(e)) => AttemptEvent::Exited {
            exit_code: e.exit_code,
            reason: e.reason,
        },
        None => {
            return Err(Status::invalid_argument(format!(
                "event is required (attempt {} of job {})",
                report.attempt, report.job_id
            )));
        }
    };
    Ok(Report {
        job: JobId::from(report.job_id),
        attempt: report.attempt,
        node: NodeId(report.node_id),
        event,
    })
}

/// Sends `node`'s full assignment set whenever it changes (and every [`RESEND`]) while this
/// control node leads with a quorum; ends the stream when it does not, so the agent finds the
/// new leader (a leader cut off from the other control nodes is one no longer, although it
/// does not know it yet).
async fn stream_assignments(
    node: RaftNode,
    agent: NodeId,
    tx: mpsc::Sender<Result<AssignmentSet, Status>>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Woken only when an applied command may have changed this agent's assignments, when
    // this node's Raft role or leader changes (openraft's server metrics, which do not move
    // with every applied entry), and when an unchanged set is due to be resent. Ten thousand
    // streams polling on a timer instead cost more than the work they watch for.
    let mut changes = node.state.node_changes(&agent);
    let mut role = node.raft.server_metrics();
    // Which attempts the last set sent held, in `assignment_keys` order (by job). An
    // attempt's assignment never changes once placed, so a set is looked at closely only when
    // its attempts changed (or is resent), and describes in full only the attempts this
    // stream has not described before: describing every attempt on every change was most of
    // the leader's CPU under load, and most of the agents' too.
    let mut last_sent: Option<Vec<(JobId, u32)>> = None;
    let mut last_sent_at = tokio::time::Instant::now();
    // Whether the assignments must be looked at again (a change, or time to resend).
    let mut look = true;
    loop {
        let (leader, term) = node.leader();
        if leader != Some(node.id) || !*leading.borrow() {
            let _ = tx
                .send(Err(Status::failed_precondition(
                    "leadership moved, or this node lost its quorum",
                )))
                .await;
            return;
        }
        let resend = last_sent_at.elapsed() >= RESEND;
        if look || resend {
            let revoked = node.state.read().state.agent_revoked(&agent);
            if revoked {
                let _ = tx
                    .send(Err(Status::permission_denied(format!(
                        "agent {agent} was revoked"
                    ))))
                    .await;
                return;
            }
            let set = {
                let applied = node.state.read();
                let keys = applied.state.assignment_keys(&agent);
                (resend || last_sent.as_ref() != Some(&keys)).then(|| {
                    let described = |job: &JobId, attempt: u32| {
                        last_sent.as_ref().is_some_and(|sent| {
                            sent.binary_search_by(|(j, a)| (j, *a).cmp(&(job, attempt)))
                                .is_ok()
                        })
                    };
                    let new = applied
                        .state
                        .assignments_among(&agent, |job, attempt| !described(job, attempt));
                    let continuing = keys
                        .iter()
                        .filter(|(job, attempt)| described(job, *attempt))
                        .map(|(job, attempt)| AttemptKey {
                            job_id: job.to_string(),
                            attempt: *attempt,
                        })
                        .collect();
                    let set = AssignmentSet {
                        term,
                        assignments: new.iter().map(assignment_to_pb).collect(),
                        continuing,
                    };
                    (keys, set)
                })
            };
            if let Some((keys, set)) = set {
                if tx.send(Ok(set)).await.is_err() {
                    return;
                }
                last_sent = Some(keys);
                last_sent_at = tokio::time::Instant::now();
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                look = true;
            }
            changed = role.changed() => {
                if changed.is_err() {
                    return;
                }
                look = false;
            }
            changed = leading.changed() => {
                if changed.is_err() {
                    return;
                }
                look = false;
            }
            _ = tokio::time::sleep_until(last_sent_at + RESEND) => look = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{NodeId, RECONNECT_SPREAD, reconnect_delay};

    #[test]
    fn held_watches_are_let_go_spread_over_the_window_each_at_its_own_moment() {
        let delays: Vec<_> = (0..1000)
            .map(|i| reconnect_delay(&NodeId(format!("worker-{i}"))))
            .collect();
        assert!(delays.iter().all(|d| *d < RECONNECT_SPREAD));
        // Spread: every tenth of the window gets some of a thousand agents.
        let tenth = RECONNECT_SPREAD / 10;
        for slot in 0..10 {
            let (from, to) = (tenth * slot, tenth * (slot + 1));
            let count = delays.iter().filter(|d| **d >= from && **d < to).count();
            assert!(
                (50..=150).contains(&count),
                "{count} agents in tenth {slot}"
            );
        }
        // Fixed per agent: an agent that calls again is let go at the same moment.
        assert_eq!(
            reconnect_delay(&NodeId("worker-7".into())),
            reconnect_delay(&NodeId("worker-7".into()))
        );
    }
}
