//! Executors: how an attempt becomes a running container or process.

mod cgroup;
mod docker;
mod process;
mod record;

pub use docker::DockerExecutor;
pub use process::ProcessExecutor;
pub use record::{AttemptRecord, Recorded};

use muster_core::Assignment;
use std::path::Path;
use tokio::sync::{oneshot, watch};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptExit {
    /// `None` when the attempt never started; `reason` then says why.
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
}

impl AttemptExit {
    pub fn failed_to_start(reason: impl Into<String>) -> Self {
        Self {
            exit_code: None,
            reason: Some(reason.into()),
        }
    }
}

pub enum Executor {
    Docker(DockerExecutor),
    Process(ProcessExecutor),
}

impl Executor {
    /// Runs one attempt to its end. `started` fires once the workload runs; `stop` asks for
    /// it to be stopped (SIGTERM, then SIGKILL after `grace`). Output goes to `log_path`.
    ///
    /// An attempt runs at most once on a host, across agent restarts (see [`AttemptRecord`]):
    /// one that ended before is reported as it ended, and one that started before is taken
    /// back where the executor can (a container) or reported lost, never started again.
    pub async fn run(
        &self,
        assignment: &Assignment,
        log_path: &Path,
        started: oneshot::Sender<()>,
        stop: watch::Receiver<bool>,
        grace: std::time::Duration,
    ) -> AttemptExit {
        let record = AttemptRecord::beside(log_path);
        let resumed = match record.read() {
            Recorded::Ended(exit) => {
                tracing::info!(job = %assignment.job, attempt = assignment.attempt, ?exit, "the attempt ended before this agent started: reporting its recorded exit");
                return exit;
            }
            Recorded::Started => true,
            Recorded::Nothing => {
                if let Err(e) = record.mark_started() {
                    return AttemptExit::failed_to_start(format!(
                        "CannotStartContainerError: cannot record the attempt at {}: {e}",
                        record.path().display()
                    ));
                }
                false
            }
        };
        let with_hostfile = match with_hostfile(assignment, log_path, self) {
            Ok(a) => a,
            Err(e) => {
                return AttemptExit::failed_to_start(format!(
                    "CannotStartContainerError: cannot write the hostfile beside {}: {e}",
                    log_path.display()
                ));
            }
        };
        let assignment = with_hostfile.as_ref().unwrap_or(assignment);
        let exit = match self {
            Executor::Docker(d) => {
                d.run(assignment, log_path, started, stop, grace, resumed)
                    .await
            }
            Executor::Process(p) => {
                p.run(assignment, log_path, &record, started, stop, grace, resumed)
                    .await
            }
        };
        if let Err(e) = record.record_end(&exit) {
            tracing::warn!(path = %record.path().display(), error = %e, "could not record how an attempt ended");
        }
        exit
    }

    /// Why this executor cannot run jobs now, if it cannot (the Docker engine does not answer).
    pub async fn health(&self) -> Option<String> {
        match self {
            Executor::Docker(d) => d.health().await,
            Executor::Process(_) => None,
        }
    }

    /// Removes what an earlier run of the agent left for attempts not in `keep` (called once
    /// the first assignment set after a start is known).
    pub async fn remove_strays(&self, keep: &std::collections::HashSet<(String, u32)>) {
        match self {
            Executor::Docker(d) => d.remove_strays(keep).await,
            Executor::Process(_) => {}
        }
    }

    /// How many attempts an agent with this work directory started still run (its processes,
    /// or its containers); `Err` when the Docker engine does not answer.
    pub async fn count_running(&self, work_dir: &Path) -> Result<usize, String> {
        match self {
            Executor::Docker(d) => d
                .running()
                .await
                .map(|c| c.len())
                .map_err(|e| e.to_string()),
            Executor::Process(_) => Ok(process::running_groups(work_dir).len()),
        }
    }

    /// Stops every attempt an agent with this work directory started that still runs
    /// (SIGTERM, SIGKILL after `grace`); returns how many there were.
    pub async fn stop_every_attempt(
        &self,
        work_dir: &Path,
        grace: std::time::Duration,
    ) -> Result<usize, String> {
        match self {
            Executor::Docker(d) => {
                let running = d.running().await.map_err(|e| e.to_string())?;
                d.stop_all(&running, grace).await;
                Ok(running.len())
            }
            Executor::Process(_) => {
                let groups = process::running_groups(work_dir);
                process::stop_groups(&groups, grace).await;
                Ok(groups.len())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Executor::Docker(_) => "docker",
            Executor::Process(_) => "process",
        }
    }
}

/// Why an attempt that an earlier run of the agent started, and that cannot be taken back,
/// is reported lost (and retried as a new attempt where its strategy allows).
pub const LOST_IN_AGENT_RESTART: &str =
    "Host agent restarted: the attempt's processes could not be re-adopted and were stopped";

/// Why a stopped attempt ended, as reported in `container.reason`.
pub const STOPPED_BY_MUSTER: &str = "Stopped by Muster";

/// Resolves once `stop` turns `true` (or its sender is gone). Holds no borrow of the value
/// across an await, so futures using it stay `Send`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where a container finds its multi-node job's hostfile.
pub const CONTAINER_HOSTFILE: &str = "/etc/muster/hostfile";

/// The hostfile of a multi-node job's node, beside the attempt's log: every node's address,
/// one a line, in index order (from `MUSTER_NODE_ADDRESSES`), as `mpirun --hostfile` reads
/// it. Where there is one, the assignment gains `MUSTER_HOSTFILE` naming it (a process sees
/// the file itself; a container sees it bound read-only at [`CONTAINER_HOSTFILE`]).
fn with_hostfile(
    assignment: &Assignment,
    log_path: &Path,
    executor: &Executor,
) -> std::io::Result<Option<Assignment>> {
    let Some((_, addresses)) = assignment
        .environment
        .iter()
        .find(|(name, _)| name == "MUSTER_NODE_ADDRESSES")
    else {
        return Ok(None);
    };
    let path = hostfile_path(log_path);
    let lines: String = addresses.split(',').map(|a| format!("{a}\n")).collect();
    std::fs::write(&path, lines)?;
    let shown = match executor {
        Executor::Docker(_) => CONTAINER_HOSTFILE.to_owned(),
        Executor::Process(_) => path.display().to_string(),
    };
    let mut with = assignment.clone();
    with.environment.push(("MUSTER_HOSTFILE".to_owned(), shown));
    Ok(Some(with))
}

/// The hostfile of the attempt whose log is `log_path`: absolute, since Docker takes a
/// relative bind source for a volume's name (`muster dev`'s data directory is relative).
pub(crate) fn hostfile_path(log_path: &Path) -> std::path::PathBuf {
    let path = log_path.with_extension("hosts");
    std::path::absolute(&path).unwrap_or(path)
}
