//! The API's view of the cluster, over Raft.

use crate::batcher::{BatchLimits, Batcher};
use muster_api::{ControlPlane, LogPage, LogRequest, LogWindow, MembershipChange, PlaneError};
use muster_core::{Command, JobSubmission, Outcome, State, Timestamp};
use muster_raft::ProposeError;
use muster_raft::RaftNode;
use muster_raft::membership::{AdminError, AdminOutcome};

/// How many submits, and how many encoded bytes of them, one entry holds at most (an entry
/// must reach a loaded follower within one heartbeat interval).
const SUBMIT_BATCH: BatchLimits = BatchLimits {
    items: 1024,
    bytes: 256 * 1024,
    in_flight: 4,
};

#[derive(Clone)]
pub struct RaftPlane {
    node: RaftNode,
    limits: muster_api::Limits,
    /// SubmitJob calls are group-committed: concurrent clients share Raft entries.
    submits: Batcher<JobSubmission>,
    /// How this node dials agents' log services; `None`: plaintext.
    agent_logs_tls: Option<muster_tls::ClientTls>,
}

impl RaftPlane {
    /// Reads agents' logs over TLS with `tls` (this node's certificate, agents' server name).
    pub fn reading_logs_with(mut self, tls: Option<muster_tls::ClientTls>) -> Self {
        self.agent_logs_tls = tls;
        self
    }

    /// Must be called inside the runtime: it starts the submit batcher.
    pub fn new(node: RaftNode, limits: muster_api::Limits) -> Self {
        let submits = Batcher::spawn(node.clone(), "submits", SUBMIT_BATCH, |subs| {
            Command::SubmitJobs(subs)
        });
        Self {
            agent_logs_tls: None,
            node,
            limits,
            submits,
        }
    }
}

impl ControlPlane for RaftPlane {
    async fn propose(&self, command: Command) -> Result<Outcome, PlaneError> {
        match command {
            Command::SubmitJob(submission) => {
                // The entry is JSON: measuring the submit the same way bounds it exactly.
                let bytes = serde_json::to_vec(&submission).map_or(0, |v| v.len());
                self.submits.commit(submission, bytes).await
            }
            command => self.node.propose(command).await.map_err(plane_error),
        }
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, PlaneError> {
        // A read changes nothing: whatever kept it from an answer, it may be asked again.
        self.node
            .read(f)
            .await
            .map_err(|e| PlaneError::Unavailable(e.to_string()))
    }

    fn read_local<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.node.state.read().state)
    }

    fn now(&self) -> Timestamp {
        crate::now_millis()
    }

    fn limits(&self) -> muster_api::Limits {
        self.limits
    }

    fn new_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    async fn cluster_status(&self) -> Result<serde_json::Value, PlaneError> {
        let status = self.node.cluster_status().await;
        serde_json::to_value(status).map_err(|e| PlaneError::Indeterminate(e.to_string()))
    }

    async fn save_snapshot(&self) -> Result<muster_api::StreamedFile, PlaneError> {
        // Current first: the replica then holds every write acknowledged before this call.
        self.node
            .read(|_| ())
            .await
            .map_err(|e| PlaneError::Unavailable(e.to_string()))?;
        let state = self.node.state.clone();
        let cluster_name = self.node.raft.config().cluster_name.clone();
        let now = crate::now_millis().as_millis();
        let saved = tokio::task::spawn_blocking(move || {
            muster_raft::backup::save(&state, &cluster_name, now, state.spool())
        })
        .await
        .map_err(|e| PlaneError::Unavailable(e.to_string()))?
        .map_err(|e| PlaneError::Unavailable(e.to_string()))?;
        tracing::info!(
            index = saved.header.index,
            jobs = saved.header.jobs,
            bytes = saved.header.image_bytes,
            "snapshot saved for a client"
        );
        Ok(muster_api::StreamedFile {
            head: saved.header_line,
            rest: saved.body,
        })
    }

    async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<serde_json::Value, PlaneError> {
        let done = match change {
            MembershipChange::AddNode {
                id,
                raft_addr,
                grpc_addr,
                api_addr,
                catch_up,
            } => {
                let member = muster_raft::Member {
                    addr: raft_addr,
                    agents: grpc_addr,
                    api: api_addr,
                };
                self.node.add_node(id, member, catch_up).await
            }
            MembershipChange::RemoveNode { id } => self.node.remove_node(id).await,
            MembershipChange::TransferLeader { to } => self.node.transfer_leader(to).await,
        };
        match done {
            Ok(AdminOutcome::Changed { voters, learners }) => {
                Ok(serde_json::json!({ "voters": voters, "learners": learners }))
            }
            Ok(AdminOutcome::Transferred(leader)) => Ok(serde_json::json!({ "leader": leader })),
            Err(AdminError::Refused(why)) => Err(PlaneError::Refused(why)),
            Err(e @ (AdminError::NoLeader(_) | AdminError::Busy(_))) => {
                Err(PlaneError::Unavailable(e.to_string()))
            }
            Err(AdminError::Failed(why)) => Err(PlaneError::Indeterminate(why)),
        }
    }

    async fn read_log(&self, request: LogRequest) -> Result<LogPage, String> {
        use muster_proto::pb::ReadLogRequest;
        use muster_proto::pb::agent_logs_client::AgentLogsClient;
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", request.log_address))
                .map_err(|e| e.to_string())?
                .connect_timeout(LOG_READ_TIMEOUT)
                .timeout(LOG_READ_TIMEOUT);
        let channel = match &self.agent_logs_tls {
            Some(tls) => {
                tls.clone()
                    .with_connect_timeout(LOG_READ_TIMEOUT)
                    .expecting(muster_tls::Role::Agent(request.node.clone()))
                    .connect(endpoint)
                    .await
            }
            None => endpoint.connect().await,
        };
        let mut client = AgentLogsClient::new(channel.map_err(|e| e.to_string())?);
        let page = client
            .read_log(ReadLogRequest {
                job_id: request.job,
                attempt: request.attempt,
                offset: match request.window {
                    LogWindow::From(offset) => offset,
                    LogWindow::Last | LogWindow::Before(_) => 0,
                },
                limit: request.limit as u32,
                from_end: !matches!(request.window, LogWindow::From(_)),
                before: match request.window {
                    LogWindow::Before(offset) => Some(offset),
                    _ => None,
                },
            })
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        Ok(LogPage {
            events: page
                .events
                .into_iter()
                .map(|e| (e.timestamp_ms, e.message))
                .collect(),
            start_offset: page.start_offset,
            next_offset: page.next_offset,
        })
    }
}

/// How long a control node waits for an agent's log service.
const LOG_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a proposal that failed may have been applied: one no leader took (none could be
/// reached, or it had no quorum) certainly was not; one a leader failed or lost may have been.
pub(crate) fn plane_error(e: ProposeError) -> PlaneError {
    match e {
        ProposeError::NoLeader(_) | ProposeError::NoQuorum => {
            PlaneError::Unavailable(e.to_string())
        }
        ProposeError::Failed(_) | ProposeError::Superseded(_) => {
            PlaneError::Indeterminate(e.to_string())
        }
    }
}
