//! The leader's housekeeping loop: forgets jobs that ended longer ago than the retention
//! period (one replicated `PurgeJobs` command, so every node forgets the same jobs).

use muster_core::{Command, Timestamp};
use muster_raft::RaftNode;
use std::time::Duration;
use tokio::sync::watch;

/// How often the loop looks for jobs to forget.
const EVERY: Duration = Duration::from_secs(60);

pub async fn run(node: RaftNode, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        if !node.is_leader() {
            continue;
        }
        let now = crate::now_millis().as_millis();
        let before = Timestamp(now.saturating_sub(retention.as_millis() as u64));
        let due = node.state.read().state.has_jobs_ended_before(before);
        if due && let Err(e) = node.write_as_leader(Command::PurgeJobs { before }).await {
            tracing::debug!(error = %e, "purge not committed");
        }
    }
}
