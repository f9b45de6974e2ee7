//! The warden on the Docker engine: a container whose agent died stops when the agent's
//! lease ends, not when the leader has retried it elsewhere. (The process executor's side
//! runs with the real binary in `processes.rs`.)

use muster_agent::executor::{DockerExecutor, Executor};
use muster_agent::lease::{boot_millis, lease_path};
use muster_agent::warden::{warden_pid_path, watch_over};
use muster_agent::{ExecutorKind, RawAgentConfig};
use muster_core::{Assignment, JobId, Resources};
use std::time::Duration;

const TEST_IMAGE: &str = "muster-test/busybox:1";

#[tokio::test]
async fn a_container_left_by_a_dead_agent_stops_when_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("agent");
    std::fs::create_dir_all(&work_dir).unwrap();
    // The agent's identity labels its containers; the warden finds them by it.
    let owner = format!("warden-test-{}", std::process::id());
    std::fs::write(work_dir.join("agent-id"), &owner).unwrap();
    let executor = std::sync::Arc::new(Executor::Docker(
        DockerExecutor::connect("ce")
            .await
            .expect("these tests need the Docker engine (tests/run.sh builds their image)")
            .with_owner(&owner),
    ));
    let job = format!("warden-{}", std::process::id());
    let assignment = Assignment {
        job: JobId::from(job.as_str()),
        attempt: 1,
        term: 1,
        image: TEST_IMAGE.to_owned(),
        command: vec!["sleep".into(), "120".into()],
        environment: vec![("AWS_BATCH_JOB_ID".to_owned(), job.clone())],
        resources: Resources::new(100, 16, 0),
        log_stream_name: String::new(),
        gpus: Vec::new(),
        timeout_secs: None,
        options: Default::default(),
    };
    // The agent runs the attempt, then dies (its task dropped: nothing stops the container).
    let log_path = muster_agent::logs::attempt_log_path(&work_dir, &job, 1);
    std::fs::create_dir_all(log_path.parent().unwrap()).unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn({
        let executor = executor.clone();
        async move {
            executor
                .run(
                    &assignment,
                    &log_path,
                    started_tx,
                    stop,
                    Duration::from_secs(1),
                )
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("the container started")
        .unwrap();
    agent.abort();
    assert_eq!(executor.count_running(&work_dir).await.unwrap(), 1);

    // Its lease had 2 s left; the agent's pid is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::write(
        lease_path(&work_dir),
        format!("{} 1000 {}\n", boot_millis() + 2_000, gone.id()),
    )
    .unwrap();
    let config = RawAgentConfig::new(
        "n1",
        "ce",
        vec!["127.0.0.1:1".into()],
        ExecutorKind::Docker,
        work_dir.clone(),
    )
    .validate()
    .unwrap();
    let warden = tokio::spawn(watch_over(config, gone.id()));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        executor.count_running(&work_dir).await.unwrap(),
        1,
        "stopped before the lease ended"
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
