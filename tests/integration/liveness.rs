//! A worker that stops heartbeating is marked lost; its attempts fail with
//! `Host <node> terminated.` and retry elsewhere. A leader change alone loses no worker.
//! An agent's stream describes each attempt once; what it reports applies once, and a bad
//! batch of reports is refused whole.

use crate::harness::{DEADLINE, TestCluster, create_basics, describe, ok, submit, wait_for_status};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_worker_is_lost_and_its_job_retries_elsewhere() {
    let tuning = muster_control::Tuning {
        // Room for a lease (node_lost_after less the agent's grace period and slack) longer
        // than the election below.
        node_lost_after: Duration::from_secs(8),
        ..Default::default()
    };
    let mut t = TestCluster::start_tuned(3, tuning).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("doomed", "ce", 1.0, 1024).await;
    let job = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "survivor", "jobQueue": "q", "jobDefinition": "d",
                   "retryStrategy": {"attempts": 2, "evaluateOnExit": [{"onStatusReason": "Host*", "action": "RETRY"},
                                                                        {"onReason": "*", "action": "EXIT"}]},
                   "containerOverrides": {"command": ["sh", "-c", "test $AWS_BATCH_JOB_ATTEMPT -ge 2 || sleep 600"]}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&client, &job, &["RUNNING"]).await;

    // A leader change alone must not cost the (healthy) worker its node.
    let leader = t.cluster.leader().unwrap();
    t.cluster.stop_node(leader).await;
    t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let client = t.follower_client();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = crate::harness::describe(&client, &job).await.unwrap();
    assert_eq!(
        still["status"], "RUNNING",
        "an election alone marked the worker lost: {still}"
    );
    t.cluster.restart_node(leader).await.unwrap();

    // Now the worker dies without a word; another one joins.
    t.kill_agent(0);
    t.add_agent("spare", "ce", 1.0, 1024).await;
    let done = wait_for_status(&client, &job, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(
        done["attempts"][0]["statusReason"],
        "Host doomed terminated."
    );
    assert_eq!(
        done["attempts"][1]["container"]["containerInstanceArn"],
        "spare"
    );

    let started = Instant::now();
    loop {
        let lost = t
            .cluster
            .running()
            .next()
            .unwrap()
            .raft
            .state
            .read()
            .state
            .node(&muster_core::NodeId("doomed".into()))
            .map(|n| n.status);
        if lost == Some(muster_core::NodeStatus::Lost) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the dead worker was never marked lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_from_the_control_plane_stops_its_jobs_itself() {
    let tuning = muster_control::Tuning {
        node_lost_after: Duration::from_secs(6),
        ..Default::default()
    };
    let mut t = TestCluster::start_tuned(3, tuning).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.agent_stop_after_secs = 1;
    t.add_agent("isolated", "ce", 1.0, 1024).await;
    let pid_file = t.dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
    let job = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "long", "jobQueue": "q", "jobDefinition": "d",
                   "containerOverrides": {"command": ["sh", "-c", script]}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&client, &job, &["RUNNING"]).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    assert!(alive(pid));

    // Every control node goes away: the agent can reach nobody.
    for id in 1..=3 {
        t.cluster.stop_node(id).await;
    }
    let started = Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the cut-off agent kept its job running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back again: the attempt ends FAILED (no retries were asked for) and ran only once.
    for id in 1..=3 {
        t.cluster.restart_node(id).await.unwrap();
    }
    t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let ended = wait_for_status(&t.client(1), &job, &["FAILED", "SUCCEEDED"]).await;
    assert_eq!(ended["status"], "FAILED", "{ended}");
    assert_eq!(ended["attempts"].as_array().unwrap().len(), 1);
    t.shutdown().await;
}

/// A node whose agent says it cannot run jobs (its Docker engine is gone) gets nothing
/// placed on it and its waiting jobs say why; once it says it is healthy, they run there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unhealthy_node_gets_no_work_until_it_recovers() {
    use muster_proto::pb;
    let t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    let leader = t.cluster.leader().expect("a leader");
    let mut agent = t.agent_client(leader, "sick").await;
    // Speaks the agent protocol by hand, so that it can say what a broken engine would.
    let inventory = pb::Inventory {
        capacity: Some(pb::Resources {
            millicpus: 4000,
            memory_mib: 4096,
            gpus: 0,
        }),
        hostname: "sick".into(),
        address: "127.0.0.1".into(),
        executor: "docker".into(),
        ..Default::default()
    };
    agent
        .register(pb::RegisterRequest {
            node_id: "sick".into(),
            compute_environment: "ce".into(),
            inventory: Some(inventory.clone()),
        })
        .await
        .expect("registers");
    let beat = |unhealthy: Option<&str>| pb::HeartbeatRequest {
        node_id: "sick".into(),
        inventory: Some(inventory.clone()),
        unhealthy: unhealthy.map(str::to_owned),
    };
    agent
        .heartbeat(beat(Some("DockerEngineUnavailable: connection refused")))
        .await
        .expect("heartbeat accepted");
    let job = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "waits", "jobQueue": "q", "jobDefinition": "d"}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    // It waits, saying there is no ready node, and is not placed.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let job = crate::harness::describe(&client, &job).await.unwrap();
        if job["statusReason"]
            .as_str()
            .is_some_and(|r| r.contains("no ready node in ce"))
        {
            assert_eq!(job["status"], "RUNNABLE");
            break;
        }
        assert!(Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent
        .heartbeat(beat(None))
        .await
        .expect("heartbeat accepted");
    // `sick` is the only node of `ce`: the job is placed there once it recovers.
    wait_for_status(&client, &job, &["STARTING", "RUNNING"]).await;
    t.shutdown().await;
}

/// The agent protocol by hand: an assignment stream describes each attempt once and then names
/// it by key. An agent may report an attempt's RUNNING and exit in one call (a job that ends
/// at once): the job ends with the time it started, a batch sent again changes nothing, and a
/// malformed or oversized batch is refused whole, naming what is wrong, with nothing applied
/// (and an empty one writes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_describe_an_attempt_once_and_reports_apply_once() {
    use muster_proto::pb;
    use pb::attempt_report::Event;
    let t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    let leader = t.cluster.leader().expect("a leader");
    // Reports may go to any node; a follower forwards them.
    let follower = if leader == 1 { 2 } else { 1 };
    let mut agent = t.agent_client(leader, "hand").await;
    let mut reporter = t.agent_client(follower, "hand").await;
    agent
        .register(pb::RegisterRequest {
            node_id: "hand".into(),
            compute_environment: "ce".into(),
            inventory: Some(pb::Inventory {
                capacity: Some(pb::Resources {
                    millicpus: 4000,
                    memory_mib: 4096,
                    gpus: 0,
                }),
                hostname: "hand".into(),
                address: "127.0.0.1".into(),
                executor: "process".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("registers");
    let job = submit(&client, "q", "d", "quick", &["true"]).await;
    let mut watch = agent
        .watch_assignments(pb::WatchRequest {
            node_id: "hand".into(),
        })
        .await
        .expect("watches")
        .into_inner();
    let attempt = loop {
        let set = watch.message().await.expect("stream").expect("a set");
        if let Some(a) = set.assignments.iter().find(|a| a.job_id == job) {
            break a.attempt;
        }
    };
    // A later set describes only what is new and names the attempt it described before.
    let second = submit(&client, "q", "d", "second", &["true"]).await;
    loop {
        let set = watch.message().await.expect("stream").expect("a set");
        if set.assignments.iter().any(|a| a.job_id == second) {
            assert!(
                set.assignments.iter().all(|a| a.job_id != job),
                "described twice: {set:?}"
            );
            assert!(
                set.continuing
                    .iter()
                    .any(|k| k.job_id == job && k.attempt == attempt),
                "{set:?}"
            );
            break;
        }
    }
    let report = |event| pb::AttemptReport {
        node_id: "hand".into(),
        job_id: job.clone(),
        attempt,
        event: Some(event),
    };
    let exited = |code| {
        Event::Exited(pb::AttemptExited {
            exit_code: Some(code),
            reason: None,
        })
    };
    let both = pb::AttemptReports {
        reports: vec![
            report(Event::Running(pb::AttemptRunning {})),
            report(exited(0)),
        ],
    };

    // Refused whole: one report without an event, or more than one entry's worth.
    let mut malformed = both.clone();
    malformed.reports.push(pb::AttemptReport {
        event: None,
        ..report(exited(0))
    });
    let refused = reporter.report_attempts(malformed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("event is required"),
        "{refused:?}"
    );
    let oversized = pb::AttemptReports {
        reports: vec![report(Event::Running(pb::AttemptRunning {})); 1025],
    };
    let refused = reporter.report_attempts(oversized).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("reports: at most 1024"),
        "{refused:?}"
    );
    let described = describe(&client, &job).await.unwrap();
    assert_eq!(
        described["status"], "STARTING",
        "nothing applied: {described}"
    );
    // An empty batch is answered and writes nothing.
    let index = t.cluster.node(leader).unwrap().raft.state.applied_index();
    let before = *index.borrow();
    reporter
        .report_attempts(pb::AttemptReports { reports: vec![] })
        .await
        .expect("accepted");
    assert_eq!(*index.borrow(), before, "an empty batch wrote an entry");

    reporter
        .report_attempts(both.clone())
        .await
        .expect("accepted");
    let done = describe(&client, &job).await.unwrap();
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert!(done["startedAt"].as_u64().is_some(), "it ran: {done}");
    // Sent again (as after a lost answer), and a late failure report: nothing changes.
    reporter.report_attempts(both).await.expect("accepted");
    reporter
        .report_attempts(pb::AttemptReports {
            reports: vec![report(exited(1))],
        })
        .await
        .expect("accepted");
    let again = describe(&client, &job).await.unwrap();
    assert_eq!(again["status"], "SUCCEEDED", "{again}");
    assert_eq!(again["attempts"].as_array().unwrap().len(), 1, "{again}");
    assert_eq!(again["container"]["exitCode"], 0, "{again}");
    t.shutdown().await;
}
