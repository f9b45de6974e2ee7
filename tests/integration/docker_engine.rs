//! The agent on the Docker engine when things go wrong: its warden stops a container whose
//! agent died once the agent's lease ends (the process executor's side runs with the real
//! binary in `processes.rs`), and an engine restarted under running containers (F15) neither
//! loses an attempt's end nor has one reported before the engine can confirm it. The restarts
//! happen to an engine of the test's own (`dockerd` on a socket in a temporary directory),
//! never to the machine's.

use muster_agent::executor::{DockerExecutor, Executor};
use muster_agent::lease::{boot_millis, lease_path};
use muster_agent::warden::{warden_pid_path, watch_over};
use muster_agent::{ExecutorKind, RawAgentConfig};
use muster_core::{Assignment, JobId, Resources};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const TEST_IMAGE: &str = "muster-test/busybox:1";

fn assignment(job: &str, command: &[&str]) -> Assignment {
    Assignment {
        job: JobId::from(job),
        attempt: 1,
        term: 1,
        image: TEST_IMAGE.to_owned(),
        command: command.iter().map(|c| (*c).to_owned()).collect(),
        environment: vec![("AWS_BATCH_JOB_ID".to_owned(), job.to_owned())],
        resources: Resources::new(100, 16, 0),
        log_stream_name: String::new(),
        gpus: Vec::new(),
        timeout_secs: None,
        options: Default::default(),
    }
}

/// A Docker engine of the test's own, restartable without touching the machine's: its socket,
/// data and state under a temporary directory, a bridge of its own (never `docker0`: an engine
/// started with `--bridge=none` deletes the machine engine's `docker0`), no iptables rules,
/// the test image loaded from the machine's engine.
struct PrivateEngine {
    dir: PathBuf,
    bridge: String,
    live_restore: bool,
    process: Option<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

impl PrivateEngine {
    fn start(dir: &Path, live_restore: bool) -> PrivateEngine {
        std::fs::create_dir_all(dir).unwrap();
        // One bridge and subnet per engine: two tests may run at once.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n =
            (std::process::id() * 4 + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) % 250;
        let bridge = format!("mtestbr{n}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.197.{n}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut engine = PrivateEngine {
            dir: dir.to_owned(),
            bridge,
            live_restore,
            process: None,
        };
        engine.up();
        // The test image, from the machine's engine (tests/run.sh builds it there).
        let mut saved = Command::new("docker")
            .args(["-H", "unix:///var/run/docker.sock", "save", TEST_IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let loaded = Command::new("docker")
            .args(["-H", &engine.host(), "load", "-q"])
            .stdin(saved.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(saved.wait().unwrap().success(), "saving {TEST_IMAGE}");
        assert!(loaded.status.success(), "loading {TEST_IMAGE}: {loaded:?}");
        engine
    }

    fn socket(&self) -> String {
        self.dir.join("docker.sock").display().to_string()
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket())
    }

    fn up(&mut self) {
        let config = self.dir.join("daemon.json");
        std::fs::write(
            &config,
            format!("{{\"live-restore\": {}}}", self.live_restore),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("--host")
            .arg(self.host())
            .arg(format!("--bridge={}", self.bridge))
            .args(["--iptables=false", "--ip6tables=false"])
            .args(["--storage-driver=vfs"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("these tests run dockerd (Debian's docker.io), as root");
        self.process = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !Command::new("docker")
            .args(["-H", &self.host(), "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the private engine did not start: {}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the engine as `systemctl stop docker` would (SIGTERM, then wait).
    fn down(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            child.wait().unwrap();
        }
    }

    fn running_containers(&self) -> usize {
        let out = Command::new("docker")
            .args(["-H", &self.host(), "ps", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        if self.process.is_some() {
            let _ = Command::new("docker")
                .args(["-H", &self.host(), "rm", "-f"])
                .args(
                    String::from_utf8_lossy(
                        &Command::new("docker")
                            .args(["-H", &self.host(), "ps", "-aq"])
                            .output()
                            .map(|o| o.stdout)
                            .unwrap_or_default(),
                    )
                    .split_whitespace(),
                )
                .output();
            // Without live-restore the engine stops what still runs as it goes.
            self.live_restore = false;
            self.down();
        }
        // vfs layers and the exec root hold mounts until the engine is gone.
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// The executor of an agent on `engine` (its socket).
async fn executor_on(engine: &PrivateEngine) -> Arc<Executor> {
    Arc::new(Executor::Docker(
        DockerExecutor::connect_to_socket(&engine.socket(), "ce")
            .await
            .expect("the private engine answers")
            .with_owner("engine-test"),
    ))
}

/// Runs `assignment` through `executor` as the agent would, in a task; returns it and what
/// says it started.
fn spawn_attempt(
    executor: Arc<Executor>,
    work_dir: &Path,
    assignment: Assignment,
) -> (
    tokio::task::JoinHandle<muster_agent::executor::AttemptExit>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let log_path = muster_agent::logs::attempt_log_path(work_dir, assignment.job.as_str(), 1);
    std::fs::create_dir_all(log_path.parent().unwrap()).unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let (_stop, stop) = tokio::sync::watch::channel(false);
        executor
            .run(
                &assignment,
                &log_path,
                started_tx,
                stop,
                Duration::from_secs(1),
            )
            .await
    });
    (task, started)
}

/// [`spawn_attempt`], returning once the attempt started.
async fn start_attempt(
    executor: Arc<Executor>,
    work_dir: &Path,
    assignment: Assignment,
) -> tokio::task::JoinHandle<muster_agent::executor::AttemptExit> {
    let (task, started) = spawn_attempt(executor, work_dir, assignment);
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("the container started")
        .unwrap();
    task
}

/// Stops the engine under the running `attempt`, checks that no end is reported while the
/// engine cannot confirm one, starts it again, and returns the end reported then.
async fn restart_under(
    engine: &mut PrivateEngine,
    attempt: tokio::task::JoinHandle<muster_agent::executor::AttemptExit>,
) -> muster_agent::executor::AttemptExit {
    engine.down();
    // A window, not a wait for a condition: what is checked is that nothing happens in it
    // (the executor, asking every second, gets at least one refusal from the absent engine).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !attempt.is_finished(),
        "an end was reported while the engine could not say how the attempt ended: {:?}",
        attempt.await
    );
    engine.up();
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .expect("the attempt's end was reported once the engine was back")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restarted_under_a_live_restored_container_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = PrivateEngine::start(&dir.path().join("engine"), true);
    let started = std::time::Instant::now();
    let attempt = start_attempt(
        executor_on(&engine).await,
        &dir.path().join("work"),
        assignment("outlives-its-engine", &["sh", "-c", "sleep 6; exit 7"]),
    )
    .await;
    let exit = restart_under(&mut engine, attempt).await;
    // The container ran on through the restart and its own exit is what is reported.
    assert_eq!(exit.exit_code, Some(7), "{exit:?}");
    assert_eq!(exit.reason, None, "{exit:?}");
    assert!(started.elapsed() >= Duration::from_secs(6));
    assert_eq!(engine.running_containers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restart_that_stops_a_container_ends_its_attempt_once_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = PrivateEngine::start(&dir.path().join("engine"), false);
    let attempt = start_attempt(
        executor_on(&engine).await,
        &dir.path().join("work"),
        assignment("stopped-by-its-engine", &["sleep", "120"]),
    )
    .await;
    // Without live-restore the engine stops its containers as it shuts down.
    let exit = restart_under(&mut engine, attempt).await;
    // Ended by the engine's shutdown (SIGTERM or SIGKILL), as the engine records it; the
    // cluster retries it as its strategy says, and nothing of it runs here any more.
    assert!(
        matches!(exit.exit_code, Some(code) if code != 0),
        "{exit:?}"
    );
    assert_eq!(engine.running_containers(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_placed_while_the_engine_restarts_starts_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = PrivateEngine::start(&dir.path().join("engine"), false);
    let executor = executor_on(&engine).await;
    engine.down();
    let (mut attempt, started) = spawn_attempt(
        executor,
        &dir.path().join("work"),
        assignment("placed-in-a-restart", &["true"]),
    );
    // The attempt must not end while the engine is away (it used to fail at once, and every
    // retry placed here before the next heartbeat too): it is awaited for 2 s, and must not
    // finish in them.
    if let Ok(ended) = tokio::time::timeout(Duration::from_secs(2), &mut attempt).await {
        panic!("the attempt ended while the engine was restarting: {ended:?}");
    }
    engine.up();
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("it started once the engine was back")
        .unwrap();
    let exit = attempt.await.unwrap();
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(exit.reason, None, "{exit:?}");
}

#[tokio::test]
async fn a_container_left_by_a_dead_agent_stops_when_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("agent");
    std::fs::create_dir_all(&work_dir).unwrap();
    // The agent's identity labels its containers; the warden finds them by it.
    let owner = format!("warden-test-{}", std::process::id());
    std::fs::write(work_dir.join("agent-id"), &owner).unwrap();
    let executor = Arc::new(Executor::Docker(
        DockerExecutor::connect("ce")
            .await
            .expect("these tests need the Docker engine (tests/run.sh builds their image)")
            .with_owner(&owner),
    ));
    let job = format!("warden-{}", std::process::id());
    // The agent runs the attempt, then dies (its task dropped: nothing stops the container).
    let agent = start_attempt(
        executor.clone(),
        &work_dir,
        assignment(&job, &["sleep", "120"]),
    )
    .await;
    agent.abort();
    assert_eq!(executor.count_running(&work_dir).await.unwrap(), 1);

    // Its lease had 2 s left; the agent's pid is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let since = std::time::Instant::now();
    std::fs::write(
        lease_path(&work_dir),
        format!("{} 1000 {}\n", boot_millis() + 2_000, gone.id()),
    )
    .unwrap();
    let config = RawAgentConfig {
        // It never reaches a control plane: only the warden reads it.
        plaintext: true,
        ..RawAgentConfig::new(
            "n1",
            "ce",
            vec!["127.0.0.1:1".into()],
            ExecutorKind::Docker,
            work_dir.clone(),
        )
    }
    .validate()
    .unwrap();
    let warden = tokio::spawn(watch_over(config, gone.id()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while executor.count_running(&work_dir).await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the container outlived the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lasted = since.elapsed();
    assert!(
        lasted >= Duration::from_secs(2),
        "stopped after {lasted:?}, before the lease ended"
    );
    tokio::time::timeout(Duration::from_secs(20), warden)
        .await
        .expect("the warden exits once nothing of its agent runs")
        .unwrap()
        .unwrap();
    assert_eq!(executor.count_running(&work_dir).await.unwrap(), 0);
    assert!(!warden_pid_path(&work_dir).exists());
    // The stopped container stays for the restarted agent to report; this test removes it.
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &format!("muster-{job}-1")])
        .output();
}
