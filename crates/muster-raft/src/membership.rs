//! Who the control nodes are, and changing that while the cluster runs: adding a node (as a
//! learner that catches up, then a voter), removing one, handing leadership over, and every
//! member's view of Raft for `muster cluster status`.
//!
//! Membership changes run on the leader; any node takes the request and forwards it there
//! (the `Admin` RPC), as it forwards writes.
//!
//! **Handing leadership over** (Raft thesis §3.10). Muster's voters refuse to elect anyone
//! while they hear from a leader (openraft's lease, and the pre-vote of [`crate::election`]),
//! so the leader makes room for its successor: it stops taking writes and confirming reads
//! ([`Handover`]), waits until the successor holds its whole log, stops its heartbeats, lets
//! the lease lapse on the other voters, and asks the successor to stand at once. The successor
//! wins because its log is as long as anyone's and nobody has heard from a leader for a lease;
//! the old leader, on the successor's first message, follows. Writes held meanwhile go on to
//! the new leader. Whatever happens, heartbeats and writes resume on the old leader if it
//! still leads when the handover gives up.

use crate::election::{HEARTBEAT, LEADER_LEASE};
use crate::network::{decode, encode};
use crate::{NodeId, PeerAddrs, RaftNode};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A control node as the Raft membership records it: where it listens.
///
/// `addr` (the Raft listener) is named as openraft's `BasicNode` names it, so that memberships
/// stored by a Muster that recorded only that address are read unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its Raft listener.
    pub addr: String,
    /// Its listener for agents (empty where not recorded).
    #[serde(default)]
    pub agents: String,
    /// Its AWS Batch API (empty where not recorded).
    #[serde(default)]
    pub api: String,
}

impl From<&PeerAddrs> for Member {
    fn from(addrs: &PeerAddrs) -> Self {
        Self {
            addr: addrs.raft.clone(),
            agents: addrs.agents.clone(),
            api: addrs.api.clone(),
        }
    }
}

impl From<&Member> for PeerAddrs {
    fn from(member: &Member) -> Self {
        Self {
            raft: member.addr.clone(),
            agents: member.agents.clone(),
            api: member.api.clone(),
        }
    }
}

/// Keeps the peer directory in step with the membership: a node added while this one runs (or
/// before it restarted with an older config) is reached at the addresses it was added with.
/// Addresses from this node's own config win. Runs until `shutdown` turns true.
pub async fn follow_membership(node: RaftNode, mut shutdown: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    loop {
        let members: Vec<(NodeId, Member)> = metrics
            .borrow_and_update()
            .membership_config
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        for (id, member) in &members {
            node.peers.learn(*id, PeerAddrs::from(member));
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// Holds the leader's writes and read confirmations while it hands leadership over, so that
/// no AppendEntries renews the other voters' lease. Shared by every writer on the node.
#[derive(Clone)]
pub struct Handover(std::sync::Arc<watch::Sender<bool>>);

impl Default for Handover {
    fn default() -> Self {
        Self(std::sync::Arc::new(watch::channel(false).0))
    }
}

/// Released when dropped: writes and reads go on.
struct HandoverInProgress<'a>(&'a Handover);

impl Drop for HandoverInProgress<'_> {
    fn drop(&mut self) {
        self.0.0.send_replace(false);
    }
}

impl Handover {
    /// Waits while a handover is in progress (a few seconds at most).
    pub async fn wait_until_settled(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|busy| !*busy).await;
    }

    /// Whether a handover is under way: a forwarded write or read confirmation arriving now
    /// is turned away at once (never taken), to go to the next leader.
    pub fn in_progress(&self) -> bool {
        *self.0.borrow()
    }

    fn begin(&self) -> Option<HandoverInProgress<'_>> {
        let started = self
            .0
            .send_if_modified(|busy| !std::mem::replace(busy, true));
        started.then_some(HandoverInProgress(self))
    }
}

/// One control node's view of Raft, as it reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub id: NodeId,
    /// `leader`, `follower`, `learner`, `candidate` or `shutdown`.
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Milliseconds since it last heard from the leader (0 on the leader).
    pub last_contact_ms: Option<u64>,
    /// The leader's own: whether a quorum acknowledged it within the lease.
    pub leads_with_quorum: bool,
    /// The leader's own: the last log index each member is known to hold.
    #[serde(default)]
    pub matched: BTreeMap<NodeId, u64>,
    /// The command level of the release it runs (`muster_core::COMMAND_LEVEL`); 0 from a
    /// release before levels were reported.
    #[serde(default)]
    pub command_level: u32,
}

/// A member as `muster cluster status` shows it (snake_case, as scripts read it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub raft_addr: String,
    pub grpc_addr: String,
    pub api_addr: String,
    /// `leader`, `follower` or `learner`; `unreachable` when it did not answer.
    pub role: String,
    pub voter: bool,
    pub reachable: bool,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// Entries the leader holds that this member is not known to hold yet.
    pub replication_lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
    /// The command level of the release it runs (1 for a release before levels).
    #[serde(default)]
    pub command_level: Option<u32>,
}

/// The cluster's control nodes as seen from the node that was asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Whether a leader holds a quorum: writes can commit.
    pub quorum: bool,
    /// The cluster's command level as this node's replica records it: what may be proposed.
    #[serde(default)]
    pub cluster_level: u32,
    pub members: Vec<MemberStatus>,
}

/// What one node asks another over the `Admin` RPC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum AdminRequest {
    /// Your own view of Raft.
    Report,
    /// Leader: add this node as a learner, wait for it to catch up, make it a voter.
    AddNode {
        id: NodeId,
        member: Member,
        catch_up_ms: u64,
    },
    /// Leader: remove this node (handing leadership over first if it is the leader).
    RemoveNode { id: NodeId },
    /// Leader: hand leadership to this voter, or to the voter furthest along.
    TransferLeader { to: Option<NodeId> },
    /// The leader handing over to you: stand for election now.
    StandNow,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum AdminReply {
    Report(NodeReport),
    /// The membership change committed; the voters and learners after it.
    Changed {
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    },
    /// Leadership went to this node.
    Transferred(NodeId),
    Standing,
    NotLeader(Option<NodeId>),
    Refused(String),
    /// Not now (another change or handover under way): nothing was done; ask again.
    Busy(String),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request cannot be done as asked (an unknown node, the last voter): asking again
    /// changes nothing.
    #[error("{0}")]
    Refused(String),
    #[error("no leader could be reached within {0:?}")]
    NoLeader(Duration),
    /// Not now: another membership change or handover is under way; nothing was done.
    #[error("{0}")]
    Busy(String),
    /// It failed, and may have been partly done (a learner added that did not catch up).
    #[error("{0}")]
    Failed(String),
}

/// What a membership change left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    Changed {
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    },
    Transferred(NodeId),
}

/// How long a leader waits for its successor to hold its whole log before handing over.
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(5);
/// How long the successor has to win its election.
const HANDOVER_ELECTION: Duration = Duration::from_secs(3);
/// How long a request for a membership change waits for a leader (a handover included).
const ADMIN_LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long a node has to answer `Report` for `status`.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

impl RaftNode {
    /// This node's view of Raft.
    pub fn report(&self) -> NodeReport {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let is_voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id);
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
            ServerState::Follower if is_voter => "follower",
            ServerState::Follower | ServerState::Learner => "learner",
        };
        let leader_here = m.state == ServerState::Leader;
        NodeReport {
            id: self.id,
            role: role.to_owned(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            last_contact_ms: if leader_here {
                Some(0)
            } else {
                self.contact.elapsed().map(|e| e.as_millis() as u64)
            },
            leads_with_quorum: leader_here && crate::election::leads_with_quorum(&self.raft),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, log)| (*id, log.map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            command_level: self.command_level,
        }
    }

    /// Leader: raises the cluster's command level to the lowest every member (voters and
    /// learners) reports, once that is above the cluster's and at least `floor` (the level
    /// that brought `SetClusterLevel`, which a node below it could not apply). Holds the lock
    /// of membership changes, so that no member joins between the asking and the proposing;
    /// does nothing while a change is under way. Returns the level it raised to.
    pub async fn raise_cluster_level(&self, floor: u32) -> Result<Option<u32>, String> {
        let current = self.state.read().state.cluster_level();
        if current >= self.command_level {
            return Ok(None);
        }
        let Ok(_no_member_changes) = self.membership_changes.try_lock() else {
            return Ok(None);
        };
        let Some(lowest) = self.lowest_member_level().await else {
            return Ok(None);
        };
        if lowest <= current || lowest < floor {
            return Ok(None);
        }
        self.write_as_leader(muster_core::Command::SetClusterLevel { level: lowest })
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(lowest))
    }

    /// The lowest command level among every member of the cluster (voters and learners), as
    /// each reports it now; `None` unless every one answered. A node of a release before
    /// levels were reported counts as level 1.
    pub async fn lowest_member_level(&self) -> Option<u32> {
        let asks = self
            .members()
            .into_keys()
            .filter(|id| *id != self.id)
            .map(|id| async move { self.ask_report(id).await });
        let mut lowest = self.command_level;
        for report in futures::future::join_all(asks).await {
            lowest = lowest.min(report?.command_level.max(1));
        }
        Some(lowest)
    }

    /// [`report`](Self::report), but a leader that does not count a quorum now waits up to a
    /// lease for one: right after a membership change openraft counts acknowledgements
    /// afresh, and a healthy leader would show no quorum for a heartbeat or two.
    async fn settled_report(&self) -> NodeReport {
        let deadline = Instant::now() + crate::election::QUORUM_LEASE;
        loop {
            let report = self.report();
            if report.role != "leader" || report.leads_with_quorum || Instant::now() >= deadline {
                return report;
            }
            tokio::time::sleep(HEARTBEAT / 2).await;
        }
    }

    /// Every member's view, gathered from each (those that do not answer within
    /// [`REPORT_TIMEOUT`] are shown unreachable). The membership is the leader's when it
    /// answers, this node's otherwise.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let mine = self.settled_report().await;
        let own_membership = self.members();
        let asks = own_membership
            .keys()
            .filter(|id| **id != self.id)
            .map(|id| {
                let id = *id;
                async move { (id, self.ask_report(id).await) }
            });
        let mut reports: BTreeMap<NodeId, NodeReport> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(id, r)| r.map(|r| (id, r)))
            .collect();
        reports.insert(self.id, mine.clone());
        let leader_report = reports
            .values()
            .filter(|r| r.role == "leader")
            .max_by_key(|r| r.term)
            .cloned();
        // The leader's membership is the newest; it may name a node this one has not heard of.
        let mut membership = own_membership;
        if let Some(leader) = leader_report.as_ref().filter(|l| l.id != self.id) {
            for id in leader.matched.keys() {
                if !membership.contains_key(id)
                    && let Some(r) = self.ask_report(*id).await
                {
                    reports.insert(*id, r);
                    membership.insert(*id, (Member::default(), false));
                }
            }
        }
        let leader_last = leader_report.as_ref().map(|l| l.last_log_index);
        let members = membership
            .iter()
            .map(|(id, (member, voter))| {
                let report = reports.get(id);
                let addrs = self
                    .peers
                    .get(*id)
                    .unwrap_or_else(|| PeerAddrs::from(member));
                let matched = leader_report.as_ref().and_then(|l| {
                    if l.id == *id {
                        Some(l.last_log_index)
                    } else {
                        l.matched.get(id).copied()
                    }
                });
                MemberStatus {
                    id: *id,
                    raft_addr: addrs.raft,
                    grpc_addr: addrs.agents,
                    api_addr: addrs.api,
                    role: report.map_or("unreachable".to_owned(), |r| {
                        if r.role == "leader" || !*voter {
                            if *voter {
                                r.role.clone()
                            } else {
                                "learner".to_owned()
                            }
                        } else {
                            "follower".to_owned()
                        }
                    }),
                    voter: *voter,
                    reachable: report.is_some(),
                    term: report.map(|r| r.term),
                    last_log_index: report.map(|r| r.last_log_index),
                    applied_index: report.map(|r| r.applied_index),
                    snapshot_index: report.map(|r| r.snapshot_index),
                    replication_lag: leader_last
                        .zip(matched)
                        .map(|(last, matched)| last.saturating_sub(matched)),
                    last_contact_ms: report.and_then(|r| r.last_contact_ms),
                    command_level: report.map(|r| r.command_level.max(1)),
                }
            })
            .collect();
        ClusterStatus {
            leader: leader_report.as_ref().map(|l| l.id).or(mine.leader),
            term: reports.values().map(|r| r.term).max().unwrap_or(mine.term),
            quorum: leader_report.is_some_and(|l| l.leads_with_quorum),
            cluster_level: self.state.read().state.cluster_level(),
            members,
        }
    }

    /// Where agents reach each voter (learners never lead), for agents to follow the
    /// membership. Addresses not known are left out.
    pub fn voters_agent_addrs(&self) -> Vec<String> {
        let metrics = self.raft.metrics();
        let voters: Vec<NodeId> = metrics
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters
            .into_iter()
            .filter_map(|id| self.peers.agent_addr(id))
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Every member this node knows, with whether it votes.
    fn members(&self) -> BTreeMap<NodeId, (Member, bool)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, member)| (*id, (member.clone(), voters.contains(id))))
            .collect()
    }

    async fn ask_report(&self, id: NodeId) -> Option<NodeReport> {
        let mut client = self.peers.raft_client(id)?;
        let mut call = tonic::Request::new(encode(&AdminRequest::Report).ok()?);
        call.set_timeout(REPORT_TIMEOUT);
        let reply = client.admin(call).await.ok()?;
        match decode(reply.get_ref()).ok()? {
            AdminReply::Report(r) => Some(r),
            _ => None,
        }
    }

    /// Adds node `id` (listening at `member`'s addresses) as a learner, waits up to
    /// `catch_up` for it to hold the leader's log (a snapshot first, where the log was
    /// purged), then makes it a voter. Runs on the leader, wherever it was asked.
    pub async fn add_node(
        &self,
        id: NodeId,
        member: Member,
        catch_up: Duration,
    ) -> Result<AdminOutcome, AdminError> {
        self.admin(AdminRequest::AddNode {
            id,
            member,
            catch_up_ms: catch_up.as_millis() as u64,
        })
        .await
    }

    /// Removes node `id` from the cluster; a leader hands leadership over first.
    pub async fn remove_node(&self, id: NodeId) -> Result<AdminOutcome, AdminError> {
        self.admin(AdminRequest::RemoveNode { id }).await
    }

    /// Hands leadership to voter `to`, or to the voter furthest along.
    pub async fn transfer_leader(&self, to: Option<NodeId>) -> Result<AdminOutcome, AdminError> {
        self.admin(AdminRequest::TransferLeader { to }).await
    }

    /// Runs `request` here if this node leads, or forwards it to the leader; follows
    /// leadership as it moves (a removal of the leader moves it on purpose).
    async fn admin(&self, request: AdminRequest) -> Result<AdminOutcome, AdminError> {
        let deadline = Instant::now() + ADMIN_LEADER_WAIT;
        let payload = encode(&request).map_err(|e| AdminError::Failed(e.to_string()))?;
        loop {
            let (leader, _) = self.leader();
            let answer = match leader {
                Some(l) if l == self.id => self.admin_as_leader(request.clone()).await,
                Some(l) => match self.peers.raft_client(l) {
                    Some(mut client) => {
                        let mut call = tonic::Request::new(payload.clone());
                        call.set_timeout(admin_timeout(&request));
                        match client.admin(call).await {
                            Ok(reply) => decode(reply.get_ref())
                                .unwrap_or_else(|e| AdminReply::Failed(e.to_string())),
                            Err(status) => AdminReply::Failed(format!(
                                "leader {l} did not answer: {}",
                                status.message()
                            )),
                        }
                    }
                    None => AdminReply::NotLeader(None),
                },
                None => AdminReply::NotLeader(None),
            };
            match answer {
                AdminReply::Changed { voters, learners } => {
                    return Ok(AdminOutcome::Changed { voters, learners });
                }
                AdminReply::Transferred(to) => return Ok(AdminOutcome::Transferred(to)),
                AdminReply::Refused(why) => return Err(AdminError::Refused(why)),
                AdminReply::Busy(why) => return Err(AdminError::Busy(why)),
                AdminReply::Failed(why) => return Err(AdminError::Failed(why)),
                AdminReply::NotLeader(_) => {}
                AdminReply::Report(_) | AdminReply::Standing => {
                    return Err(AdminError::Failed(
                        "unexpected answer from the leader".into(),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(AdminError::NoLeader(ADMIN_LEADER_WAIT));
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// Serves an `Admin` RPC.
    pub(crate) async fn serve_admin(&self, request: AdminRequest) -> AdminReply {
        match request {
            AdminRequest::Report => AdminReply::Report(self.settled_report().await),
            AdminRequest::StandNow => {
                tracing::info!("the leader hands leadership to this node: standing now");
                match self.raft.trigger().elect().await {
                    Ok(()) => AdminReply::Standing,
                    Err(e) => AdminReply::Failed(e.to_string()),
                }
            }
            other => self.admin_as_leader(other).await,
        }
    }

    async fn admin_as_leader(&self, request: AdminRequest) -> AdminReply {
        if !self.is_leader() {
            return AdminReply::NotLeader(self.leader().0);
        }
        // One change at a time: a second one's entries would renew the leases a handover
        // waits out, and openraft takes one membership change at a time anyway.
        let Ok(_one_at_a_time) = self.membership_changes.try_lock() else {
            return AdminReply::Busy(
                "another membership change or handover is under way; try again when it is done"
                    .into(),
            );
        };
        let result = match request {
            AdminRequest::AddNode {
                id,
                member,
                catch_up_ms,
            } => {
                self.add_as_leader(id, member, Duration::from_millis(catch_up_ms))
                    .await
            }
            AdminRequest::RemoveNode { id } => self.remove_as_leader(id).await,
            AdminRequest::TransferLeader { to } => {
                self.hand_over(to).await.map(AdminReply::Transferred)
            }
            AdminRequest::Report | AdminRequest::StandNow => {
                Err(AdminReply::Failed("not a leader's request".into()))
            }
        };
        result.unwrap_or_else(|reply| reply)
    }

    async fn add_as_leader(
        &self,
        id: NodeId,
        member: Member,
        catch_up: Duration,
    ) -> Result<AdminReply, AdminReply> {
        if id == 0 {
            return Err(AdminReply::Refused("id: must be at least 1".into()));
        }
        let members = self.members();
        if let Some((known, voter)) = members.get(&id) {
            if *known != member {
                return Err(AdminReply::Refused(format!(
                    "id: node {id} is already a member at raft address {}; add the new machine \
                     under a new id (an id is never reused)",
                    known.addr
                )));
            }
            if *voter {
                return Ok(changed(&self.members()));
            }
        }
        if let Some((other, _)) = members
            .iter()
            .find(|(other, (m, _))| **other != id && m.addr == member.addr)
        {
            return Err(AdminReply::Refused(format!(
                "raftAddr: {} is node {other}'s",
                member.addr
            )));
        }
        tracing::info!(id, raft_addr = %member.addr, "adding a control node as a learner");
        // Not openraft's blocking wait: it counts a learner within `replication_lag_threshold`
        // (5,000) entries as caught up, and entries here carry thousands of jobs each.
        let added = self
            .change_to_completion(
                ChangeMembers::AddNodes(BTreeMap::from([(id, member.clone())])),
                true,
            )
            .await?;
        let target = added.max(self.raft.metrics().borrow().last_log_index.unwrap_or(0));
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout(catch_up, async {
            metrics
                .wait_for(|m| {
                    m.replication.as_ref().is_none_or(|r| {
                        r.get(&id)
                            .copied()
                            .flatten()
                            .is_some_and(|l| l.index >= target)
                    })
                })
                .await
                .map(|_| ())
        })
        .await;
        match caught_up {
            Err(_) => {
                return Err(AdminReply::Failed(format!(
                    "node {id} was added as a learner but did not catch up within {catch_up:?} \
                     (is it running at raft address {}?); it stays a learner: run add-node again \
                     to wait longer, or remove-node {id}",
                    member.addr
                )));
            }
            Ok(Err(e)) => return Err(AdminReply::Failed(e.to_string())),
            Ok(Ok(_)) if !self.is_leader() => return Err(AdminReply::NotLeader(self.leader().0)),
            Ok(Ok(_)) => {}
        }
        tracing::info!(id, "the learner caught up: making it a voter");
        self.change_to_completion(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await?;
        Ok(changed(&self.members()))
    }

    async fn remove_as_leader(&self, id: NodeId) -> Result<AdminReply, AdminReply> {
        let members = self.members();
        let Some((_, voter)) = members.get(&id) else {
            return Err(AdminReply::Refused(format!(
                "id: node {id} is not a member of this cluster"
            )));
        };
        let change = if *voter {
            let voters = members.values().filter(|(_, v)| *v).count();
            if voters == 1 {
                return Err(AdminReply::Refused(format!(
                    "id: node {id} is the only voter; a cluster cannot remove its last voter"
                )));
            }
            if id == self.id {
                // The leader goes last: its successor removes it.
                let successor = self.hand_over(None).await?;
                return Err(AdminReply::NotLeader(Some(successor)));
            }
            // The change commits only with a majority of the voters left (joint consensus
            // needs both majorities): with too few of them answering, it would hang half
            // done and stop every write until they came back.
            let remaining: Vec<NodeId> = members
                .iter()
                .filter(|(other, (_, v))| *v && **other != id)
                .map(|(other, _)| *other)
                .collect();
            let answering = self.answering(&remaining).await;
            if answering.len() * 2 <= remaining.len() {
                return Err(AdminReply::Refused(format!(
                    "id: removing node {id} leaves voters {remaining:?}, of which only {answering:?} answer: \
                     not a majority, so the change could not commit; bring voters back first"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(id, "removing a control node");
        self.change_to_completion(change, false).await?;
        Ok(changed(&self.members()))
    }

    /// Runs a membership change to its end on a task of its own: openraft commits a joint
    /// configuration, then the final one, and a caller that went away between the two (a
    /// client's timeout, Ctrl-C) must not leave the cluster in the joint one. Returns the
    /// log index of the change.
    async fn change_to_completion(
        &self,
        change: ChangeMembers<NodeId, Member>,
        retain: bool,
    ) -> Result<u64, AdminReply> {
        let raft = self.raft.clone();
        // As for a command (`node::client_write`): `ForwardToLeader` proves nothing was taken
        // only where this node was not leading when it was handed the change.
        let could_take = raft.server_metrics().borrow().state == ServerState::Leader;
        tokio::spawn(async move {
            crate::node::answered_while_leading(&raft, raft.change_membership(change, retain)).await
        })
        .await
        .map_err(|e| AdminReply::Failed(e.to_string()))?
        .ok_or_else(|| AdminReply::Failed(crate::WriteError::Unanswered.to_string()))?
        .map(|written| written.log_id.index)
        .map_err(|e| match e {
            openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(_),
            ) if could_take => AdminReply::Failed(crate::WriteError::Dropped.to_string()),
            e => leader_error(e),
        })
    }

    /// Which of `ids` answer a report now (this node always does).
    async fn answering(&self, ids: &[NodeId]) -> Vec<NodeId> {
        let asks = ids.iter().map(|id| async move {
            let answers = *id == self.id || self.ask_report(*id).await.is_some();
            answers.then_some(*id)
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Hands leadership over (see the module's documentation); returns the new leader.
    async fn hand_over(&self, to: Option<NodeId>) -> Result<NodeId, AdminReply> {
        let members = self.members();
        let voters: Vec<NodeId> = members
            .iter()
            .filter(|(id, (_, voter))| *voter && **id != self.id)
            .map(|(id, _)| *id)
            .collect();
        let matched = |id: NodeId| -> u64 {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map_or(0, |l| l.index)
        };
        let target = match to {
            Some(t) if t == self.id => return Ok(t),
            Some(t) if voters.contains(&t) => t,
            Some(t) => {
                return Err(AdminReply::Refused(format!(
                    "to: node {t} is not a voter of this cluster"
                )));
            }
            None => {
                if voters.is_empty() {
                    return Err(AdminReply::Refused(
                        "this cluster has no other voter to lead it".into(),
                    ));
                }
                // Only a voter that answers now: one that just died may hold the whole log.
                *self
                    .answering(&voters)
                    .await
                    .iter()
                    .max_by_key(|v| matched(**v))
                    .ok_or_else(|| {
                        AdminReply::Failed(format!(
                            "none of the other voters {voters:?} answers; leadership stays"
                        ))
                    })?
            }
        };
        let Some(_holding) = self.handover.begin() else {
            return Err(AdminReply::Busy(
                "a handover of leadership is already in progress".into(),
            ));
        };
        tracing::info!(to = target, "handing leadership over");
        let caught_up_by = Instant::now() + HANDOVER_CATCH_UP;
        loop {
            let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            if matched(target) >= last {
                break;
            }
            if Instant::now() >= caught_up_by || !self.is_leader() {
                return Err(AdminReply::Failed(format!(
                    "node {target} did not catch up with the leader's log within {HANDOVER_CATCH_UP:?}; leadership stays"
                )));
            }
            tokio::time::sleep(HEARTBEAT / 4).await;
        }
        self.raft.runtime_config().heartbeat(false);
        let _resume = HeartbeatsResume(self.raft.clone());
        let result = async {
            // A write that passed the gate just before it closed may have gone out since.
            let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            if matched(target) < last {
                return Err(AdminReply::Failed(format!(
                    "node {target} fell behind the leader's log as the handover began; leadership stays"
                )));
            }
            // Every voter's lease on this leader lapses.
            tokio::time::sleep(LEADER_LEASE + HEARTBEAT).await;
            let mut client = self.peers.raft_client(target).ok_or_else(|| {
                AdminReply::Failed(format!("no address is known for node {target}"))
            })?;
            let payload =
                encode(&AdminRequest::StandNow).map_err(|e| AdminReply::Failed(e.to_string()))?;
            let mut call = tonic::Request::new(payload);
            call.set_timeout(HANDOVER_ELECTION);
            client
                .admin(call)
                .await
                .map_err(|s| AdminReply::Failed(format!("node {target}: {}", s.message())))?;
            let mut metrics = self.raft.metrics();
            let elected = tokio::time::timeout(
                HANDOVER_ELECTION,
                metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != self.id)),
            )
            .await;
            match elected {
                Ok(Ok(m)) => Ok(m.current_leader.unwrap_or(target)),
                _ => Err(AdminReply::Failed(format!(
                    "node {target} was asked to stand but was not elected within {HANDOVER_ELECTION:?}"
                ))),
            }
        }
        .await;
        match &result {
            Ok(new) => tracing::info!(leader = new, "leadership handed over"),
            Err(e) => tracing::warn!(error = ?e, "handing leadership over failed"),
        }
        result
    }
}

/// Turns the leader's heartbeats back on when a handover ends, however it ends (a new leader
/// ignores it; an old one that still leads needs them).
struct HeartbeatsResume(crate::Raft);

impl Drop for HeartbeatsResume {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}

/// The leader's membership after a change.
fn changed(members: &BTreeMap<NodeId, (Member, bool)>) -> AdminReply {
    AdminReply::Changed {
        voters: members
            .iter()
            .filter(|(_, (_, v))| *v)
            .map(|(id, _)| *id)
            .collect(),
        learners: members
            .iter()
            .filter(|(_, (_, v))| !*v)
            .map(|(id, _)| *id)
            .collect(),
    }
}

fn leader_error(
    e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
) -> AdminReply {
    use openraft::error::{ClientWriteError, RaftError};
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            AdminReply::NotLeader(f.leader_id)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            c @ openraft::error::ChangeMembershipError::InProgress(_),
        )) => AdminReply::Busy(c.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            AdminReply::Refused(c.to_string())
        }
        other => AdminReply::Failed(other.to_string()),
    }
}

/// How long a forwarded request may take at the leader.
fn admin_timeout(request: &AdminRequest) -> Duration {
    match request {
        AdminRequest::AddNode { catch_up_ms, .. } => {
            Duration::from_millis(*catch_up_ms) + Duration::from_secs(30)
        }
        _ => Duration::from_secs(30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TypeConfig;

    /// Entries and snapshots written before members carried their agent and API addresses
    /// (openraft's `BasicNode`, `{"addr": …}`) are read unchanged, and what is written now is
    /// read back whole.
    #[test]
    fn memberships_stored_by_an_earlier_release_are_read() {
        let earlier = r#"{"log_id":{"leader_id":{"term":1,"node_id":1},"index":1},"payload":{"Membership":{"configs":[[1,2,3]],"nodes":{"1":{"addr":"10.0.0.11:7102"},"2":{"addr":"10.0.0.12:7102"},"3":{"addr":"10.0.0.13:7102"}}}}}"#;
        let entry: openraft::Entry<TypeConfig> = serde_json::from_str(earlier).unwrap();
        let openraft::EntryPayload::Membership(membership) = &entry.payload else {
            panic!("{entry:?}");
        };
        let node = membership.get_node(&2).unwrap();
        assert_eq!(node.addr, "10.0.0.12:7102");
        assert_eq!(node.agents, "");
        assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);

        let now = Member {
            addr: "10.0.0.14:7102".into(),
            agents: "10.0.0.14:7101".into(),
            api: "10.0.0.14:7070".into(),
        };
        let written = serde_json::to_string(&now).unwrap();
        assert_eq!(serde_json::from_str::<Member>(&written).unwrap(), now);
    }
}
