//! The warden: a small process beside the agent that outlives it, and stops the attempts the
//! agent left running once the agent's lease ends.
//!
//! An agent killed (or hung) while its attempts run leaves them running: a process executor's
//! jobs are their own process groups, a container runs on in the engine. Were the agent down
//! past the leader's node-lost time, the leader would retry them elsewhere while they still
//! ran here. The agent's lease (`crate::lease`) bounds how long they may run without contact,
//! and the agent itself enforces it while it runs; the warden enforces the same deadline,
//! read from the lease file, when the agent cannot. It stops what runs a second after the
//! lease ended (SIGTERM, SIGKILL after the grace period), and exits once the agent is gone and
//! nothing of it runs. A restarted agent finds the warden still there (`warden.pid`) or
//! starts another.

use crate::AgentConfig;
use crate::agent::{AgentError, executor_for};
use crate::lease::{LeaseFile, boot_millis, lease_path};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `muster` subcommand that runs a warden (how a running one is recognised).
pub const WARDEN_SUBCOMMAND: &str = "agent-warden";

/// How often the warden looks at the lease.
const WARDEN_CHECK: Duration = Duration::from_secs(1);

/// How long after the lease's end the warden acts: the agent, if it runs, goes first.
const WARDEN_SLACK_MS: u64 = 1_000;

/// Where the warden of the agent with this work directory writes its pid.
pub fn warden_pid_path(work_dir: &Path) -> PathBuf {
    work_dir.join("warden.pid")
}

/// Starts the warden of this agent (`program agent-warden --config CONFIG --agent-pid
/// <this process>`, in its own process group, its output in `work_dir/warden.log`) unless one
/// runs already.
/// `executor` is the agent's, which `muster agent --executor` may have set over the config's.
pub fn ensure_warden(
    program: &Path,
    config_path: &Path,
    work_dir: &Path,
    executor: crate::ExecutorKind,
) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if warden_running(work_dir) {
        return Ok(());
    }
    std::fs::create_dir_all(work_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work_dir.join("warden.log"))?;
    let child = std::process::Command::new(program)
        .arg(WARDEN_SUBCOMMAND)
        .arg("--config")
        .arg(config_path)
        .arg("--agent-pid")
        .arg(std::process::id().to_string())
        .arg("--executor")
        .arg(executor.as_str())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Not the agent's group: a signal to the agent (Ctrl-C, a supervisor's stop of its
        // group aside) does not reach it.
        .process_group(0)
        .spawn()?;
    // Written here too, so that an agent restarted at once does not start a second.
    std::fs::write(warden_pid_path(work_dir), child.id().to_string())?;
    // Never waited on: it is meant to outlive this agent (and is re-parented when it does).
    drop(child);
    Ok(())
}

/// Whether the warden of this work directory runs.
pub fn warden_running(work_dir: &Path) -> bool {
    std::fs::read_to_string(warden_pid_path(work_dir))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                cmd.split(|b| *b == 0)
                    .any(|arg| arg == WARDEN_SUBCOMMAND.as_bytes())
            })
        })
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    let exists = unsafe { libc::kill(pid as i32, 0) } == 0;
    // A zombie (killed, not yet reaped by its parent) is gone for this purpose.
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
            })
            .unwrap_or(true)
}

/// Watches over the attempts of the agent `agent_pid` (the lease file names the agent from its
/// first tick on) until that agent is gone and none of its attempts runs.
pub async fn watch_over(config: AgentConfig, agent_pid: u32) -> Result<(), AgentError> {
    let executor = executor_for(&config).await?;
    let pid_path = warden_pid_path(&config.work_dir);
    std::fs::write(&pid_path, std::process::id().to_string()).map_err(AgentError::WorkDir)?;
    tracing::info!(work_dir = %config.work_dir.display(), agent_pid, "warden watching over the agent's attempts");
    let lease_file = lease_path(&config.work_dir);
    let mut stopped_once = false;
    loop {
        tokio::time::sleep(WARDEN_CHECK).await;
        let lease = LeaseFile::read(&lease_file);
        // The agent that started this warden, until its lease names it (an earlier run's
        // lease may name one long gone), and any later agent whose lease it is.
        let agent_alive =
            process_alive(agent_pid) || lease.is_some_and(|l| process_alive(l.agent_pid));
        let ended = match lease {
            Some(l) => boot_millis() > l.deadline_ms + WARDEN_SLACK_MS,
            // No lease: the agent is starting (and writes one within a second), or it stopped
            // cleanly (and stopped its attempts itself), or it died before its first.
            None => !agent_alive,
        };
        let running = match executor.count_running(&config.work_dir).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the agent's attempts");
                continue;
            }
        };
        if ended && running > 0 {
            let grace = lease.map_or(config.stop_grace, |l| Duration::from_millis(l.grace_ms));
            tracing::warn!(
                running,
                agent_alive,
                "the agent's lease ended with attempts still running: stopping them, for the \
                 cluster may retry them elsewhere"
            );
            stopped_once = true;
            if let Err(e) = executor.stop_every_attempt(&config.work_dir, grace).await {
                tracing::error!(error = %e, "cannot stop the agent's attempts");
            }
            continue;
        }
        if !agent_alive && running == 0 {
            tracing::info!(
                stopped_once,
                "the agent is gone and none of its attempts runs: warden exiting"
            );
            // Only our own pid file: a new agent may have started another warden meanwhile.
            if std::fs::read_to_string(&pid_path)
                .is_ok_and(|t| t.trim() == std::process::id().to_string())
            {
                let _ = std::fs::remove_file(&pid_path);
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn config(work_dir: &Path) -> AgentConfig {
        let mut raw = crate::RawAgentConfig::new(
            "n1",
            "ce",
            vec!["127.0.0.1:1".into()],
            crate::ExecutorKind::Process,
            work_dir.to_owned(),
        );
        raw.plaintext = true;
        raw.validate().unwrap()
    }

    /// What a killed agent leaves of a running attempt: its process group and its pid file.
    fn orphan(work_dir: &Path, job: &str, attempt: u32) -> std::process::Child {
        let log = crate::logs::attempt_log_path(work_dir, job, attempt);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("60")
            .env("AWS_BATCH_JOB_ID", job)
            .env("AWS_BATCH_JOB_ATTEMPT", attempt.to_string())
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(log.with_extension("pid"), child.id().to_string()).unwrap();
        // Until the child has exec'd, its environment is still the test's.
        let marker = format!("AWS_BATCH_JOB_ID={job}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{}/environ", child.id()))
            .unwrap_or_default()
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the orphan never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    fn write_lease(work_dir: &Path, left_ms: i64, agent_pid: u32) {
        let deadline_ms = (boot_millis() as i64 + left_ms).max(0) as u64;
        std::fs::write(
            lease_path(work_dir),
            format!("{deadline_ms} 1000 {agent_pid}\n"),
        )
        .unwrap();
    }

    fn a_dead_pid() -> u32 {
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        gone.id()
    }

    fn ended(child: &mut std::process::Child) -> bool {
        child.try_wait().unwrap().is_some()
    }

    /// How long after `since` the child was found ended (polled every 100 ms, for 15 s at most).
    async fn ended_after(child: &mut std::process::Child, since: std::time::Instant) -> Duration {
        while !ended(child) {
            assert!(
                since.elapsed() < Duration::from_secs(15),
                "the attempt outlived the lease"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        since.elapsed()
    }

    #[tokio::test]
    async fn a_dead_agents_attempts_are_stopped_when_its_lease_ends_and_the_warden_then_exits() {
        let dir = tempfile::tempdir().unwrap();
        let mut left = orphan(dir.path(), "job-a", 2);
        let dead = a_dead_pid();
        // The agent died with 2 s of lease left: its attempt runs until then, not longer.
        let since = std::time::Instant::now();
        write_lease(dir.path(), 2_000, dead);
        let warden = tokio::spawn(watch_over(config(dir.path()), dead));
        let lasted = ended_after(&mut left, since).await;
        assert!(
            lasted >= Duration::from_secs(2),
            "stopped after {lasted:?}, before the lease ended"
        );
        let exited = tokio::time::timeout(Duration::from_secs(10), warden).await;
        assert!(exited.is_ok(), "the warden did not exit once nothing ran");
        exited.unwrap().unwrap().unwrap();
        assert!(!warden_pid_path(dir.path()).exists());
    }

    #[tokio::test]
    async fn a_live_agents_attempts_run_on_while_its_lease_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = orphan(dir.path(), "job-b", 1);
        // An unrelated process named by a stale pid file is never touched.
        let mut stranger = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let stale = crate::logs::attempt_log_path(dir.path(), "job-c", 1).with_extension("pid");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, stranger.id().to_string()).unwrap();

        // The agent lives but hangs (no longer renewing) with 3 s of lease left: its attempt
        // runs that long, and the lease ends all the same.
        let me = std::process::id();
        let since = std::time::Instant::now();
        write_lease(dir.path(), 3_000, me);
        let warden = tokio::spawn(watch_over(config(dir.path()), me));
        let lasted = ended_after(&mut running, since).await;
        assert!(
            lasted >= Duration::from_secs(3),
            "stopped after {lasted:?}, while the lease held"
        );
        assert!(
            !ended(&mut stranger),
            "a process no attempt names was stopped"
        );
        assert!(
            !warden.is_finished(),
            "the warden left while its agent lived"
        );
        warden.abort();
        let _ = stranger.kill();
        let _ = stranger.wait();
    }
}
