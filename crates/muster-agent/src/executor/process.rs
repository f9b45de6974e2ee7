//! The process executor: runs the job's command directly on the host, for machines without
//! Docker and for tests. The image is not used; the environment is the same as in a container.

use super::cgroup::Hierarchy;
use super::{
    AttemptExit, AttemptRecord, LOST_IN_AGENT_RESTART, Recorded, STOPPED_BY_MUSTER, stopped,
};
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

    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        assignment: &Assignment,
        log_path: &Path,
        record: &AttemptRecord,
        started: oneshot::Sender<()>,
        mut stop: watch::Receiver<bool>,
        grace: Duration,
        resumed: bool,
    ) -> AttemptExit {
        let Some((program, args)) = assignment.command.split_first() else {
            return AttemptExit::failed_to_start(
                "CannotStartContainerError: the job has no command",
            );
        };
        let pid_path = log_path.with_extension("pid");
        let cgroup_name = format!("{}-{}", assignment.job, assignment.attempt);
        if resumed {
            return self.take_back(assignment, &pid_path, &cgroup_name, record);
        }
        let Some(program_path) = find_program(program, &assignment.environment) else {
            return AttemptExit::failed_to_start(format!(
                "CannotStartContainerError: {program}: no such executable file"
            ));
        };
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
            Some(h) => match h.create(&cgroup_name, &assignment.resources) {
                Ok(g) => Some(std::sync::Arc::new(g)),
                Err(e) => {
                    return AttemptExit::failed_to_start(format!(
                        "CannotStartContainerError: cannot set resource limits: {e}"
                    ));
                }
            },
        };
        // The job runs under a small shell that waits for it and records its exit beside the
        // log, so that a job that ends while the agent is down is reported as it ended.
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(WRAPPER)
            .arg("muster-attempt")
            .arg(record.path())
            .arg(&program_path);
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
        // The attempt's record now holds its end: the pid has no more use.
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

/// Runs the job (`$2…`) and records how it ended in the attempt's record (`$1`), whole or
/// not at all. SIGTERM reaches the job through its process group; the shell waits for the
/// job's end rather than dying first, so the job's own exit status is what is recorded and
/// returned.
const WRAPPER: &str = r#"record=$1; shift
trap : TERM INT HUP
"$@"
code=$?
printf 'exited %s\n' "$code" > "$record.tmp" && mv -f "$record.tmp" "$record"
exit "$code""#;

impl ProcessExecutor {
    /// An attempt an earlier run of this agent started and did not see end. Its processes
    /// cannot be waited on by a new parent (nor their output read), so what still runs is
    /// stopped, its cgroup removed, and the attempt reported as its record says if the job
    /// ended meanwhile, or else lost — never run a second time behind the leader's back.
    fn take_back(
        &self,
        assignment: &Assignment,
        pid_path: &Path,
        cgroup_name: &str,
        record: &AttemptRecord,
    ) -> AttemptExit {
        // The group its pid file names; and, should the agent have died before writing that
        // file, any process whose environment names this attempt.
        let mut orphans: Vec<i32> = orphan_group(pid_path, assignment).into_iter().collect();
        orphans.extend(processes_of(assignment));
        for orphan in orphans {
            tracing::warn!(job = %assignment.job, attempt = assignment.attempt, pid = orphan, "stopping an attempt an earlier run of this agent started");
            signal_group(Some(orphan), libc::SIGKILL);
            // SAFETY: kill(2) has no memory-safety preconditions; the pid's environment named
            // this attempt a moment ago.
            unsafe {
                libc::kill(orphan, libc::SIGKILL);
            }
        }
        if let Some(group) = self.cgroups.as_ref().and_then(|h| h.existing(cgroup_name)) {
            group.kill_all();
            group.remove();
        }
        let _ = std::fs::remove_file(pid_path);
        match record.read() {
            Recorded::Ended(exit) => exit,
            _ => AttemptExit::failed_to_start(LOST_IN_AGENT_RESTART),
        }
    }
}

/// Where `program` is, as `execvp` would find it: itself when it names a path, else the first
/// executable of that name on the job's `PATH` (the agent's when the job sets none).
fn find_program(program: &str, environment: &[(String, String)]) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = Path::new(program);
        return executable(path).then(|| path.to_owned());
    }
    let search = environment
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
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

/// Every process on the host whose environment names this attempt (job id and attempt).
fn processes_of(a: &Assignment) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            let has = |entry: String| environ.split(|b| *b == 0).any(|e| e == entry.as_bytes());
            has(format!("AWS_BATCH_JOB_ID={}", a.job.0))
                && has(format!("AWS_BATCH_JOB_ATTEMPT={}", a.attempt))
        })
        .collect()
}

/// The process groups of attempts that agents with this work directory started and that still
/// run: each from its attempt's pid file, and only where the group leader's environment names
/// that attempt (a pid may have been reused since).
pub(crate) fn running_groups(work_dir: &Path) -> Vec<i32> {
    let Ok(jobs) = std::fs::read_dir(work_dir.join("logs")) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for job_dir in jobs.flatten() {
        let Ok(files) = std::fs::read_dir(job_dir.path()) else {
            continue;
        };
        let job_dir_name = job_dir.file_name().to_string_lossy().into_owned();
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(attempt) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(pgid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
                .filter(|p| *p > 0)
            else {
                continue;
            };
            let Ok(environ) = std::fs::read(format!("/proc/{pgid}/environ")) else {
                continue;
            };
            let value = |name: &str| {
                environ.split(|b| *b == 0).find_map(|e| {
                    std::str::from_utf8(e)
                        .ok()?
                        .strip_prefix(name)?
                        .strip_prefix('=')
                        .map(str::to_owned)
                })
            };
            let named_here = value("AWS_BATCH_JOB_ID")
                .is_some_and(|job| job.replace(['/', ':'], "_") == job_dir_name)
                && value("AWS_BATCH_JOB_ATTEMPT").as_deref() == Some(attempt);
            if named_here {
                groups.push(pgid);
            }
        }
    }
    groups
}

/// Stops these process groups: SIGTERM, then SIGKILL to those still there after `grace`.
pub(crate) async fn stop_groups(groups: &[i32], grace: Duration) {
    for pgid in groups {
        signal_group(Some(*pgid), libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    // SAFETY: kill(2) with signal 0 only checks that the group exists.
    let alive = |pgid: &i32| unsafe { libc::kill(-*pgid, 0) } == 0;
    while groups.iter().any(alive) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for pgid in groups.iter().filter(|p| alive(p)) {
        signal_group(Some(*pgid), libc::SIGKILL);
    }
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

    /// One attempt through the executor as the agent runs it (its record included).
    async fn run_with(
        executor: ProcessExecutor,
        assignment: &Assignment,
        log_path: &Path,
    ) -> AttemptExit {
        let (started, _) = oneshot::channel();
        let (_stop, stop) = watch::channel(false);
        super::super::Executor::Process(executor)
            .run(assignment, log_path, started, stop, Duration::from_secs(1))
            .await
    }

    async fn run_once(assignment: &Assignment, log_path: &Path) -> AttemptExit {
        run_with(ProcessExecutor::default(), assignment, log_path).await
    }

    fn assignment(job: &str, attempt: u32, script: &str) -> Assignment {
        Assignment {
            job: JobId::from(job),
            attempt,
            term: 1,
            image: String::new(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            environment: vec![
                ("AWS_BATCH_JOB_ID".to_owned(), job.to_owned()),
                ("AWS_BATCH_JOB_ATTEMPT".to_owned(), attempt.to_string()),
            ],
            resources: Resources::new(1000, 64, 0),
            log_stream_name: String::new(),
            gpus: Vec::new(),
            timeout_secs: None,
            options: Default::default(),
        }
    }

    /// Waits until a process whose environment names `job` runs (a child's environment is
    /// the parent's until it has exec'd).
    fn wait_for_exec(pid: u32, job: &str) {
        let needle = format!("AWS_BATCH_JOB_ID={job}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            assert!(std::time::Instant::now() < deadline, "{job} never started");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn an_attempt_that_ended_is_reported_as_it_ended_and_never_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let log_path = dir.path().join("1.log");
        let job = assignment(
            "ran-once",
            1,
            &format!("echo ran >> {}; exit 3", runs.display()),
        );
        let first = run_once(&job, &log_path).await;
        assert_eq!(first.exit_code, Some(3));
        // The agent restarts before the exit is committed, and the leader assigns the attempt
        // again: the same exit is reported, and the job does not run a second time.
        let again = run_once(&job, &log_path).await;
        assert_eq!(again, first);
        assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n");
    }

    #[tokio::test]
    async fn a_job_that_ended_while_the_agent_was_down_is_reported_with_its_own_exit() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let log_path = dir.path().join("1.log");
        let job = assignment(
            "ended-unwatched",
            1,
            &format!("echo ran >> {}; exit 7", runs.display()),
        );
        // What a killed agent leaves: the attempt's record says it started, and the job runs
        // on under its wrapper, which records its end.
        let record = AttemptRecord::beside(&log_path);
        record.mark_started().unwrap();
        let mut wrapped = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg("muster-attempt")
            .arg(record.path())
            .args(&job.command)
            .envs(job.environment.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .spawn()
            .unwrap();
        std::fs::write(log_path.with_extension("pid"), wrapped.id().to_string()).unwrap();
        assert_eq!(wrapped.wait().unwrap().code(), Some(7));
        // The restarted agent is assigned the attempt again.
        let exit = run_once(&job, &log_path).await;
        assert_eq!(exit.exit_code, Some(7), "{exit:?}");
        assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n");

        // One that ended with no record of its end (the agent died before its wrapper ran)
        // is reported lost, and not run.
        let log_path = dir.path().join("2.log");
        let lost = assignment(
            "ended-unrecorded",
            2,
            &format!("echo ran >> {}", runs.display()),
        );
        AttemptRecord::beside(&log_path).mark_started().unwrap();
        let exit = run_once(&lost, &log_path).await;
        assert_eq!(exit, AttemptExit::failed_to_start(LOST_IN_AGENT_RESTART));
        assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n");
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
        // What a killed agent leaves behind: the attempt's record, its process group and its
        // pid file.
        AttemptRecord::beside(&log_path).mark_started().unwrap();
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
        assert!(
            exit.reason
                .as_deref()
                .unwrap()
                .contains("could not be re-adopted")
        );
        // The orphan is gone (killed by the signal), and nothing ran a second time.
        let status = orphan.wait().unwrap();
        assert!(!status.success());
        assert!(!log_path.exists());
        assert!(!log_path.with_extension("pid").exists());

        // Assigned again, it is still not run: its record says how it ended.
        assert_eq!(run_once(&assignment, &log_path).await, exit);
        assert!(!log_path.exists());

        // A pid file naming someone else's process (a reused pid) is not acted on.
        let log_path = dir.path().join("2.log");
        let second = Assignment {
            attempt: 2,
            ..assignment.clone()
        };
        AttemptRecord::beside(&log_path).mark_started().unwrap();
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(log_path.with_extension("pid"), stranger.id().to_string()).unwrap();
        let exit = run_once(&second, &log_path).await;
        assert_eq!(exit, AttemptExit::failed_to_start(LOST_IN_AGENT_RESTART));
        assert!(!log_path.exists(), "not run");
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
                let record = AttemptRecord::beside(&log_path);
                let exit = executor
                    .run(
                        &assignment,
                        &log_path,
                        &record,
                        started,
                        stop,
                        Duration::from_secs(1),
                        false,
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

        // An agent killed under a running attempt leaves its process in its group; the
        // restarted agent, assigned the attempt again, stops it and removes the group.
        let orphaned = assignment_in(&job, 3);
        let log_path = dir.path().join("3.log");
        AttemptRecord::beside(&log_path).mark_started().unwrap();
        let group = hierarchy
            .create(&format!("{job}-3"), &orphaned.resources)
            .unwrap();
        let group_dir = group.memory_dir().to_owned();
        let mut orphan = {
            use std::os::unix::process::CommandExt;
            let group = std::sync::Arc::new(group);
            let mut command = std::process::Command::new("sleep");
            command
                .arg("600")
                .envs(orphaned.environment.iter().map(|(k, v)| (k, v)))
                .process_group(0);
            // SAFETY: the closure only opens and writes files (see `enter_from_child`).
            unsafe {
                command.pre_exec(move || group.enter_from_child());
            }
            command.spawn().unwrap()
        };
        wait_for_exec(orphan.id(), &job);
        std::fs::write(log_path.with_extension("pid"), orphan.id().to_string()).unwrap();
        assert!(group_dir.is_dir());
        let exit = run_with(
            ProcessExecutor {
                cgroups: Some(hierarchy.clone()),
            },
            &orphaned,
            &log_path,
        )
        .await;
        assert_eq!(exit, AttemptExit::failed_to_start(LOST_IN_AGENT_RESTART));
        assert!(!orphan.wait().unwrap().success(), "the orphan was killed");
        assert!(
            !group_dir.exists(),
            "the orphan's cgroup {} is removed",
            group_dir.display()
        );
    }

    fn assignment_in(job: &str, attempt: u32) -> Assignment {
        Assignment {
            resources: Resources::new(500, 32, 0),
            ..assignment(job, attempt, "true")
        }
    }
}
