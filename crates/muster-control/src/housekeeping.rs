//! The leader's housekeeping loop, over a job's life after it ended: once it has been ended
//! for [`JobHistory::in_memory`] its family moves out of memory into the archive on disk (one
//! replicated `ArchiveEnded` command, so every node moves the same jobs), and once it has been
//! ended for [`JobHistory::retention`] it is forgotten (`PurgeJobs`).
//!
//! Ended jobs wait in memory first because moving and storing them costs each replica CPU and
//! disk writes: done as they end, a burst of short jobs paid it while the cluster was busiest
//! placing the next ones (placements fell by more than half in the bench). Done a minute later,
//! in batches, the work comes after the burst, and the jobs clients poll right after they end
//! are answered from memory.

use muster_core::{Command, Outcome, Timestamp};
use muster_raft::RaftNode;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long ended jobs stay in memory, then on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobHistory {
    /// After this long ended, a job family moves to the archive (`ended_jobs_in_memory_secs`).
    pub in_memory: Duration,
    /// After this long ended, a job is forgotten (`job_retention_days`).
    pub retention: Duration,
}

impl Default for JobHistory {
    fn default() -> Self {
        Self {
            in_memory: DEFAULT_ENDED_JOBS_IN_MEMORY,
            retention: Duration::from_secs(crate::config::DEFAULT_JOB_RETENTION_DAYS * 86_400),
        }
    }
}

/// How long an ended job stays in memory, unless configured.
pub const DEFAULT_ENDED_JOBS_IN_MEMORY: Duration = Duration::from_secs(60);

/// How often the loop looks for ended jobs to archive (from the oldest, up to the first family
/// that can go: families still waiting for a member are walked again each time).
const ARCHIVE_EVERY: Duration = Duration::from_secs(1);

/// How often it looks for jobs to forget (a scan of the jobs in memory).
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The most jobs one `ArchiveEnded` moves (a family is never split): each replica moves them
/// under its state's write lock, so a backlog goes over in pieces of some tens of milliseconds.
const ARCHIVE_BATCH: u32 = 10_000;

pub async fn run(node: RaftNode, history: JobHistory, mut shutdown: watch::Receiver<bool>) {
    let mut purged_at = Instant::now();
    let mut level_checked_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(ARCHIVE_EVERY) => {}
        }
        if !node.is_leader() {
            continue;
        }
        if level_checked_at.is_none_or(|at| at.elapsed() >= LEVEL_CHECK_EVERY) {
            level_checked_at = Some(Instant::now());
            raise_cluster_level(&node).await;
        }
        let now = crate::now_millis().as_millis();
        // A node of a release before `ArchiveEnded` would stop at it.
        if node.state.read().state.cluster_level() >= muster_core::LEVEL_ARCHIVE_ENDED {
            archive(
                &node,
                Timestamp(now.saturating_sub(history.in_memory.as_millis() as u64)),
            )
            .await;
        }
        if purged_at.elapsed() < PURGE_EVERY {
            continue;
        }
        purged_at = Instant::now();
        let before = Timestamp(now.saturating_sub(history.retention.as_millis() as u64));
        let due = node.state.read().state.has_jobs_ended_before(before);
        if due && let Err(e) = node.write_as_leader(Command::PurgeJobs { before }).await {
            tracing::debug!(error = %e, "purge not committed");
        }
    }
}

/// How often the leader asks every control node for its command level while the cluster's is
/// below its own.
const LEVEL_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Raises the cluster's command level to the lowest every control node reports, once all run
/// a release that knows `SetClusterLevel` (level 3).
async fn raise_cluster_level(node: &RaftNode) {
    match node
        .raise_cluster_level(muster_core::LEVEL_ARCHIVE_ENDED)
        .await
    {
        Ok(Some(level)) => tracing::info!(
            level,
            "every control node runs a newer release: the cluster's command level rose"
        ),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "cluster level not raised"),
    }
}

/// Moves what ended before `before` to the archive, a batch per command.
async fn archive(node: &RaftNode, before: Timestamp) {
    while node.state.read().state.has_archivable_before(before) {
        let command = Command::ArchiveEnded {
            before,
            max_jobs: ARCHIVE_BATCH,
        };
        match node.write_as_leader(command).await {
            Ok(written) if matches!(written.data, Outcome::Archived { more: true, .. }) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "archiving not committed");
                return;
            }
        }
    }
}
