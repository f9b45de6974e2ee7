//! The API's view of the cluster, over Raft.

use muster_api::ControlPlane;
use muster_core::{Command, Outcome, State, Timestamp};
use muster_raft::RaftNode;

#[derive(Clone)]
pub struct RaftPlane {
    pub node: RaftNode,
    pub limits: muster_api::Limits,
}

impl ControlPlane for RaftPlane {
    async fn propose(&self, command: Command) -> Result<Outcome, String> {
        self.node.propose(command).await.map_err(|e| e.to_string())
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, String> {
        self.node.read(f).await.map_err(|e| e.to_string())
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
}
