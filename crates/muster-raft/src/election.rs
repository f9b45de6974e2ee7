//! When a control node stands for election, and when a leader counts as leading.
//!
//! openraft 0.9 stands a follower as soon as its election timer runs out, raising its term
//! first. A follower behind a flaky link therefore raised the term again and again while it
//! could not win, and when its link came back the leader, meeting the higher term in an
//! AppendEntries answer, stepped down: a healthy cluster left without a leader for nothing.
//! Muster runs openraft with its own elections turned off and stands a node itself, only after
//! a **pre-vote** (Raft thesis §9.6, etcd's `PreVote`): the node asks the other voters whether
//! they would vote for it, without raising any term, and calls the real election only when a
//! majority would. A voter says no while it has heard from a leader within the leader lease
//! (leader stickiness) or when the asker's log is behind its own; a leader says no while a
//! quorum has acknowledged it within [`QUORUM_LEASE`].
//!
//! [`QUORUM_LEASE`] is also how long a leader counts as leading (etcd's CheckQuorum): past
//! it, the other voters may already have elected another, so the node stops acting as leader
//! towards agents (see `RaftNode::leads_with_quorum`) although openraft only learns of the new
//! term when the partition heals.

use crate::network::{ChannelCache, decode, encode};
use crate::{NodeId, PeerDirectory, Raft};
use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the leader tells followers it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// A follower's election timeout is drawn from this range (see `raft_config`).
pub const ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(400);
pub const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(600);
/// How long a voter that heard from a leader refuses to help elect another; openraft's own
/// lease for real votes is the same (`election_timeout_max`).
pub const LEADER_LEASE: Duration = ELECTION_TIMEOUT_MAX;
/// How long after a quorum last acknowledged it a leader still counts as leading. The other
/// voters refuse to elect anyone for [`LEADER_LEASE`] after its last heartbeat and stand only
/// after an election timeout more, so no other leader exists for 1,000 ms after the
/// acknowledgements were sent. The leader reads their age from openraft's metrics, which may
/// be one tick (150 ms) old, and the answers took a round trip to arrive: 100 ms is left for
/// that.
pub const QUORUM_LEASE: Duration = Duration::from_millis(
    LEADER_LEASE.as_millis() as u64 + ELECTION_TIMEOUT_MIN.as_millis() as u64
        - METRICS_TICK.as_millis() as u64
        - 100,
);

/// How often openraft refreshes its metrics at the least (its tick, 1.5 heartbeats).
const METRICS_TICK: Duration = Duration::from_millis(HEARTBEAT.as_millis() as u64 * 3 / 2);

/// When this node last heard from the leader of its term: an AppendEntries or snapshot chunk
/// it accepted. Shared by the Raft server (which records) and the election loop (which reads).
#[derive(Clone, Default)]
pub struct LeaderContact(Arc<Mutex<Option<Instant>>>);

impl LeaderContact {
    pub fn touch(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// How long ago this node last heard from a leader; `None` if never since it started.
    pub fn elapsed(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
    }
}

/// Whether `raft` leads and a quorum acknowledged it within [`QUORUM_LEASE`].
pub fn leads_with_quorum(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    m.state == ServerState::Leader
        && m.current_leader == Some(m.id)
        && m.millis_since_quorum_ack
            .is_some_and(|ms| Duration::from_millis(ms) < QUORUM_LEASE)
}

/// Whether `raft` believes it leads but has gone without a quorum past the lease: a write
/// handed to it now would wait for the quorum to come back, or forever.
pub fn leads_without_quorum(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    m.state == ServerState::Leader
        && m.millis_since_quorum_ack
            .is_none_or(|ms| Duration::from_millis(ms) >= QUORUM_LEASE)
}

/// How this node's elections went since it started: what an operator (and a test) reads to
/// tell a node that stood and lost from one that never stood.
#[derive(Debug, Default)]
pub struct ElectionTally {
    /// Pre-votes this node asked for and lost (it did not stand, and no term was raised).
    pub pre_votes_lost: std::sync::atomic::AtomicU64,
    /// Elections it called after winning a pre-vote.
    pub elections_called: std::sync::atomic::AtomicU64,
}

impl ElectionTally {
    pub fn pre_votes_lost(&self) -> u64 {
        self.pre_votes_lost
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn elections_called(&self) -> u64 {
        self.elections_called
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// "Would you vote for me?", asked before a real election and changing no one's term.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PreVoteRequest {
    pub candidate: NodeId,
    /// The term the candidate would stand in (for the voters' logs).
    pub term: u64,
    pub last_log_id: Option<LogId<NodeId>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PreVoteReply {
    pub granted: bool,
    /// Why not, for the candidate's log.
    pub refused_because: Option<String>,
}

/// Whether this node would vote for `request`'s candidate now.
pub(crate) fn answer_pre_vote(
    raft: &Raft,
    contact: &LeaderContact,
    request: &PreVoteRequest,
) -> PreVoteReply {
    let refuse = |why: String| PreVoteReply {
        granted: false,
        refused_because: Some(why),
    };
    if leads_with_quorum(raft) {
        return refuse("this node leads with a quorum".into());
    }
    if let Some(heard) = contact.elapsed().filter(|e| *e < LEADER_LEASE) {
        return refuse(format!(
            "heard from the leader {} ms ago",
            heard.as_millis()
        ));
    }
    // Terms are not compared: a candidate whose term is behind learns the newer one from
    // the real election's answers, while refusing it here could leave two survivors, one
    // ahead in term and the other in log, refusing each other forever.
    let mine = raft.data_metrics().borrow().last_log;
    if request.last_log_id < mine {
        return refuse(format!(
            "the candidate's log ends at {:?}, before this node's {:?}",
            request.last_log_id, mine
        ));
    }
    PreVoteReply {
        granted: true,
        refused_because: None,
    }
}

/// Stands this node for election, after a pre-vote, whenever it has heard from no leader for a
/// randomized election timeout beyond the leader lease (1.0–1.2 s, as openraft's own timer).
/// Runs on the Raft runtime until `shutdown` turns true.
pub async fn run_elections(
    raft: Raft,
    id: NodeId,
    peers: PeerDirectory,
    contact: LeaderContact,
    tally: Arc<ElectionTally>,
    jitter_seed: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    // Channels of this runtime's own (see `ChannelCache`).
    let channels = peers.new_channel_cache();
    let mut jitter = Jitter::new(id, jitter_seed);
    let mut quiet_since = Instant::now();
    let mut timeout = jitter.election_timeout();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(HEARTBEAT / 2) => {}
        }
        let (state, term, is_voter, others) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            (
                m.state,
                m.current_term,
                voters.contains(&id),
                voters.into_iter().filter(|v| *v != id).collect::<Vec<_>>(),
            )
        };
        if let Some(heard) = contact.elapsed() {
            quiet_since = quiet_since.max(Instant::now() - heard);
        }
        if state == ServerState::Leader || !is_voter {
            quiet_since = Instant::now();
            continue;
        }
        if quiet_since.elapsed() < timeout {
            continue;
        }
        let request = PreVoteRequest {
            candidate: id,
            term: term + 1,
            last_log_id: raft.data_metrics().borrow().last_log,
        };
        let granted = 1 + pre_vote(&channels, &peers, &others, &request).await;
        let voters = others.len() + 1;
        if granted * 2 > voters {
            tracing::info!(
                term = request.term,
                granted,
                voters,
                "pre-vote won: standing for election"
            );
            tally.elections_called.fetch_add(1, Ordering::Relaxed);
            if raft.trigger().elect().await.is_err() {
                return;
            }
        } else {
            tracing::debug!(
                term = request.term,
                granted,
                voters,
                "pre-vote lost: not standing"
            );
            tally.pre_votes_lost.fetch_add(1, Ordering::Relaxed);
        }
        quiet_since = Instant::now();
        timeout = jitter.election_timeout();
    }
}

/// Asks every other voter at once; counts the yeses that come within the shortest election
/// timeout.
async fn pre_vote(
    channels: &ChannelCache,
    peers: &PeerDirectory,
    others: &[NodeId],
    request: &PreVoteRequest,
) -> usize {
    let Ok(payload) = encode(request) else {
        return 0;
    };
    let asks = others.iter().filter_map(|peer| {
        let mut client = channels.raft_client(&peers.raft_addr(*peer)?)?;
        let mut call = tonic::Request::new(payload.clone());
        call.set_timeout(ELECTION_TIMEOUT_MIN);
        let peer = *peer;
        Some(async move {
            let reply = client.pre_vote(call).await.ok()?;
            let reply: PreVoteReply = decode(reply.get_ref()).ok()?;
            if let Some(why) = &reply.refused_because {
                tracing::debug!(peer, why, "pre-vote refused");
            }
            Some(reply.granted)
        })
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter(|granted| *granted == Some(true))
        .count()
}

/// Election timeouts drawn uniformly from `LEADER_LEASE + [min, max)`, so that voters that
/// lost their leader together do not all stand at the same moment. A small xorshift seeded
/// from the node id and the caller's seed ([`jitter_seed`] in a real node, the simulation's
/// own seed there): no two nodes draw the same sequence.
struct Jitter(u64);

/// A seed for a node's election timeouts: its start time, so that restarts draw anew.
pub fn jitter_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Jitter {
    fn new(id: NodeId, seed: u64) -> Self {
        Self((seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn election_timeout(&mut self) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = (ELECTION_TIMEOUT_MAX - ELECTION_TIMEOUT_MIN).as_millis() as u64;
        LEADER_LEASE + ELECTION_TIMEOUT_MIN + Duration::from_millis(self.0 % span.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn election_timeouts_lie_past_the_lease_and_differ() {
        let mut jitter = Jitter::new(1, jitter_seed());
        let drawn: Vec<Duration> = (0..1000).map(|_| jitter.election_timeout()).collect();
        assert!(
            drawn
                .iter()
                .all(|d| *d >= LEADER_LEASE + ELECTION_TIMEOUT_MIN
                    && *d < LEADER_LEASE + ELECTION_TIMEOUT_MAX)
        );
        let distinct: std::collections::BTreeSet<_> = drawn.iter().collect();
        assert!(distinct.len() > 100, "{} distinct timeouts", distinct.len());
    }

    #[test]
    fn the_quorum_lease_ends_before_the_other_voters_may_stand() {
        // A follower stands no sooner than `LEADER_LEASE + ELECTION_TIMEOUT_MIN` after its last
        // heartbeat; the leader's view of its acknowledgements may be a tick old.
        assert!(QUORUM_LEASE + METRICS_TICK < LEADER_LEASE + ELECTION_TIMEOUT_MIN);
        assert_eq!(QUORUM_LEASE, Duration::from_millis(750));
    }
}
