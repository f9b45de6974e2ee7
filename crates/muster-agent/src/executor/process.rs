//! The process executor: runs the job's command directly on the host, for machines without
//! Docker and for tests. The image is not used; the environment is the same as in a container.

use super::cgroup::Hierarchy;
use super::{AttemptExit, STOPPED_BY_MUSTER, stopped};
use muster_core::Assignment;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

/// Runs attempts as host processes, each in a cgroup that holds it to its vCPUs and memory
/// where the host lets the agent make cgroups.
#[derive(Default)]
pub struct ProcessExecutor {
    cgroups: Option<Hierarchy>,
}

impl ProcessExecutor {
    /// Limits attempts through the cgroup hierarchy under `cgroup_root` if this process may
    /// make groups there; otherwise says why not, and runs them unlimited.
    pub fn new(cgroup_root: &Path) -> Self {
        match Hierarchy::detect(cgroup_root) {
            Ok(h) => {
                tracing::info!(hierarchy = ?h, "process attempts get cgroup limits");
                Self { cgroups: Some(h) }
            }
            Err(why) => {
                tracing::warn!(%why, "process attempts run without memory or CPU limits");
                Self { cgroups: None }
            }
        }
    }

    pub async fn run(
        &self,
        assignment: &Assignment,
        log_path: &Path,
        started: oneshot::Sender<()>,
        mut stop: watch::Receiver<bool>,
        grace: Duration,
    ) -> AttemptExit {
        let Some((program, args)) = assignment.command.split_first() else {
            return AttemptExit::failed_to_start(
                "CannotStartContainerError: the job has no command",
            );
        };
        // This attempt ran here before the agent restarted: its processes cannot be waited
        // on by a new parent, so they are ended, and the attempt is reported lost rather than
        // run a second time behind the leader's back (it retries per its strategy).
        let pid_path = log_path.with_extension("pid");
        if let Some(orphan) = orphan_group(&pid_path, assignment) {
            signal_group(Some(orphan), libc::SIGKILL);
            let _ = std::fs::remove_file(&pid_path);
            return AttemptExit::failed_to_start(
                "Host agent restarted: the attempt's processes could not be re-adopted and were stopped",
            );
        }
        let log = match open_log(log_path) {
            Ok(f) => std::sync::Arc::new(std::sync::Mutex::new(f)),
            Err(e) => {
                return AttemptExit::failed_to_start(format!(
                    "CannotStartContainerError: cannot open log: {e}"
                ));
            }
        };
        let cgroup = match &self.cgroups {
            None => None,
            Some(h) => {
                let name = format!("{}-{}", assignment.job, assignment.attempt);
                match h.create(&name, &assignment.resources) {
                    Ok(g) => Some(std::sync::Arc::new(g)),
                    Err(e) => {
                        return AttemptExit::failed_to_start(format!(
                            "CannotStartContainerError: cannot set resource limits: {e}"
                        ));
                    }
                }
            }
        };
        let mut command = Command::new(program);
        if let Some(group) = &cgroup {
            let group = group.clone();
            // SAFETY: the closure only opens and writes files (see `enter_from_child`).
            unsafe {
                command.pre_exec(move || group.enter_from_child());
            }
        }
        let mut child = match command
            .args(args)
            .envs(assignment.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that stopping it reaches everything it started.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                return AttemptExit::failed_to_start(format!(
                    "CannotStartContainerError: {program}: {e}"
                ));
            }
        };
        let _ = started.send(());
        // Each line is stamped as it arrives, as Docker does for containers.
        let copies = [
            child
                .stdout
                .take()
                .map(|o| tokio::spawn(copy_lines(o, log.clone()))),
            child
                .stderr
                .take()
                .map(|e| tokio::spawn(copy_lines(e, log.clone()))),
        ];
        let pgid = child.id().map(|pid| pid as i32);
        if let Some(pgid) = pgid {
            let _ = std::fs::write(&pid_path, pgid.to_string());
        }
        let exit = tokio::select! {
            status = child.wait() => AttemptExit { exit_code: Some(exit_code(status)), reason: None },
            _ = stopped(&mut stop) => {
                signal_group(pgid, libc::SIGTERM);
                let status = match tokio::time::timeout(grace, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        signal_group(pgid, libc::SIGKILL);
                        child.wait().await
                    }
                };
                AttemptExit { exit_code: Some(exit_code(status)), reason: Some(STOPPED_BY_MUSTER.to_owned()) }
            }
        };
        // What the job left running ends with it (and lets go of its output pipes).
        if let Some(group) = &cgroup {
            group.kill_all();
        }
        // Without a cgroup, a background process the job left behind may hold the pipes open:
        // do not wait on it.
        for copy in copies.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), copy).await;
        }
        let _ = std::fs::remove_file(&pid_path);
        let mut exit = exit;
        if let Some(group) = cgroup {
            if group.oom_killed() {
                exit.reason = Some("OutOfMemoryError: Container killed due to memory usage".into());
            }
            group.remove();
        }
        exit
    }
}

/// Copies `from` into the attempt's log line by line, each stamped with when it arrived.
async fn copy_lines(
    from: impl tokio::io::AsyncRead + Unpin,
    log: std::sync::Arc<std::sync::Mutex<crate::logs::AttemptLog>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let mut file = log.lock().unwrap_or_else(|p| p.into_inner());
                let _ = file.write_line(crate::logs::now_millis(), &line);
            }
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<crate::logs::AttemptLog> {
    crate::logs::AttemptLog::open(path, crate::logs::ATTEMPT_LOG_MAX_BYTES)
}

/// Exit code as a shell reports it: the code, or 128 + the signal that ended the process.
fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|sig| 128 + sig))
            .unwrap_or(-1),
        Err(_) => -1,
    }
}

/// The process group recorded in `pid_path` if it is still alive and is this attempt's:
/// its leader's environment names the same job and attempt (so a reused pid is never
/// signalled).
fn orphan_group(pid_path: &Path, a: &Assignment) -> Option<i32> {
    let pgid: i32 = std::fs::read_to_string(pid_path)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let environ = std::fs::read(format!("/proc/{pgid}/environ")).ok()?;
    let has = |entry: String| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes());
    (has(format!("AWS_BATCH_JOB_ID={}", a.job.0))
        && has(format!("AWS_BATCH_JOB_ATTEMPT={}", a.attempt)))
    .then_some(pgid)
}

fn signal_group(pgid: Option<i32>, signal: i32) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: kill(2) with a negative pid signals the process group we created; it has no
        // memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::{JobId, Resources};

    async fn run_once(assignment: &Assignment, log_path: &Path) -> AttemptExit {
        let (started, _) = oneshot::channel();
        let (_stop, stop) = watch::channel(false);
        ProcessExecutor::default()
            .run(assignment, log_path, started, stop, Duration::from_secs(1))
            .await
    }

    #[tokio::test]
    async fn an_attempt_left_running_by_a_killed_agent_is_stopped_not_run_twice() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("1.log");
        let environment = vec![
            ("AWS_BATCH_JOB_ID".to_owned(), "orphaned".to_owned()),
            ("AWS_BATCH_JOB_ATTEMPT".to_owned(), "1".to_owned()),
        ];
        // What a killed agent leaves behind: the attempt's process group and its pid file.
        let mut orphan = std::process::Command::new("sleep")
            .arg("30")
            .envs(environment.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(log_path.with_extension("pid"), orphan.id().to_string()).unwrap();
        // Until the child has exec'd, its environment is still the test's.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{}/environ", orphan.id()))
            .unwrap_or_default()
            .windows(b"AWS_BATCH_JOB_ID=orphaned".len())
            .any(|w| w == b"AWS_BATCH_JOB_ID=orphaned")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the orphan never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let assignment = Assignment {
            job: JobId::from("orphaned"),
            attempt: 1,
            term: 1,
            image: String::new(),
            command: vec!["sh".into(), "-c".into(), "echo ran again".into()],
            environment,
            resources: Resources::new(1000, 64, 0),
            log_stream_name: String::new(),
            gpus: Vec::new(),
            timeout_secs: None,
            options: Default::default(),
        };
        let exit = run_once(&assignment, &log_path).await;
        assert_eq!(exit.exit_code, None);
        assert!(exit.reason.unwrap().contains("could not be re-adopted"));
        // The orphan is gone (killed by the signal), and nothing ran a second time.
        let status = orphan.wait().unwrap();
        assert!(!status.success());
        assert!(!log_path.exists());
        assert!(!log_path.with_extension("pid").exists());

        // A pid file naming someone else's process (a reused pid) is not acted on.
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(log_path.with_extension("pid"), stranger.id().to_string()).unwrap();
        let exit = run_once(&assignment, &log_path).await;
        assert_eq!(exit.exit_code, Some(0));
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "the stranger was left alone"
        );
        stranger.kill().unwrap();
        let _ = stranger.wait();
    }

    #[tokio::test]
    async fn an_attempt_is_held_to_its_vcpus_and_memory_by_a_cgroup() {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchy = match Hierarchy::detect(root) {
            Ok(h) => h,
            // SAFETY: geteuid has no preconditions.
            Err(why) if unsafe { libc::geteuid() } != 0 => {
                // Only root makes cgroups: anyone else gets an executor that says so and runs
                // attempts unlimited.
                assert!(ProcessExecutor::new(root).cgroups.is_none(), "{why}");
                return;
            }
            Err(why) => panic!("running as root, yet no cgroup hierarchy: {why}"),
        };
        let executor = ProcessExecutor {
            cgroups: Some(hierarchy.clone()),
        };
        let dir = tempfile::tempdir().unwrap();
        let job = format!("cgroup-test-{}", std::process::id());
        let (cpu_file, cpu_expected, memory_file) = match &hierarchy {
            Hierarchy::Unified { base } => (
                base.join(format!("{job}-1/cpu.max")),
                "50000 100000",
                base.join(format!("{job}-1/memory.max")),
            ),
            Hierarchy::Split { memory, cpu } => (
                cpu.as_ref()
                    .expect("a cpu controller")
                    .join(format!("{job}-1/cpu.cfs_quota_us")),
                "50000",
                memory.join(format!("{job}-1/memory.limit_in_bytes")),
            ),
        };
        let run = |attempt: u32, script: String| {
            let assignment = Assignment {
                job: JobId::from(job.as_str()),
                attempt,
                term: 1,
                image: String::new(),
                command: vec!["sh".into(), "-c".into(), script],
                environment: Vec::new(),
                // Half a vCPU and 32 MiB.
                resources: Resources::new(500, 32, 0),
                log_stream_name: String::new(),
                gpus: Vec::new(),
                timeout_secs: None,
                options: Default::default(),
            };
            let log_path = dir.path().join(format!("{attempt}.log"));
            let executor = &executor;
            async move {
                let (started, _) = oneshot::channel();
                let (_stop, stop) = watch::channel(false);
                let exit = executor
                    .run(
                        &assignment,
                        &log_path,
                        started,
                        stop,
                        Duration::from_secs(1),
                    )
                    .await;
                (exit, std::fs::read_to_string(&log_path).unwrap_or_default())
            }
        };

        // The job runs inside its group, whose limits are its vCPUs and memory; what it leaves
        // running in the background ends with it.
        let pid_file = dir.path().join("background.pid");
        let (exit, log) = run(
            1,
            format!(
                "sleep 600 & echo $! > {}; cat /proc/self/cgroup; cat {}; cat {}",
                pid_file.display(),
                cpu_file.display(),
                memory_file.display()
            ),
        )
        .await;
        assert_eq!(exit.exit_code, Some(0), "{exit:?} {log}");
        assert!(log.contains(&format!("/muster/{job}-1")), "{log}");
        assert!(log.contains(cpu_expected), "{log}");
        assert!(log.contains(&(32 * 1024 * 1024).to_string()), "{log}");
        assert!(
            !cpu_file.parent().unwrap().exists(),
            "the group is removed after the attempt"
        );

        // Going over the memory limit gets the job killed, reported as AWS Batch does.
        let (exit, log) = run(
            2,
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}".to_owned(),
        )
        .await;
        assert_ne!(exit.exit_code, Some(0), "{exit:?} {log}");
        assert!(!log.contains("survived"), "{log}");
        assert_eq!(
            exit.reason.as_deref(),
            Some("OutOfMemoryError: Container killed due to memory usage"),
            "{log}"
        );
    }
}
