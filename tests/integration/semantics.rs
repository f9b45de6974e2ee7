//! Job semantics through a real cluster and a process agent: retries, attempt timeouts,
//! array jobs and dependencies.

use crate::harness::{DEADLINE, TestCluster, create_basics, ok, wait_for_status};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_timeouts_arrays_and_dependencies() {
    // Tests may lower AWS's 60-second minimum timeout; the API never can.
    let limits = muster_api::Limits {
        min_attempt_duration_secs: 1,
        ..Default::default()
    };
    let mut t = TestCluster::start_with_limits(3, limits).await;
    let client = t.client(2);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 4.0, 4096).await;
    let submit = |body: serde_json::Value| {
        let client = client.clone();
        async move {
            let mut body = body;
            body["jobQueue"] = json!("q");
            body["jobDefinition"] = json!("d");
            ok(client.call("SubmitJob", body).await)["jobId"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };

    // Fails twice, then succeeds: the attempt number is in the environment.
    let flaky = submit(json!({"jobName": "flaky", "retryStrategy": {"attempts": 3},
        "containerOverrides": {"command": ["sh", "-c", "test $AWS_BATCH_JOB_ATTEMPT -ge 3"]}}))
    .await;
    // Runs past its timeout every time: stopped, failed with AWS's reason, retried once.
    let slow = submit(json!({"jobName": "slow", "timeout": {"attemptDurationSeconds": 1}, "retryStrategy": {"attempts": 2},
        "containerOverrides": {"command": ["sleep", "30"]}}))
    .await;
    // An array whose children see their index, and a job that waits for the whole array.
    let array = submit(json!({"jobName": "arr", "arrayProperties": {"size": 3},
        "containerOverrides": {"command": ["sh", "-c", "echo index=$AWS_BATCH_JOB_ARRAY_INDEX size=$AWS_BATCH_JOB_ARRAY_SIZE"]}}))
    .await;
    let after = submit(json!({"jobName": "after", "dependsOn": [{"jobId": array}],
        "containerOverrides": {"command": ["true"]}}))
    .await;

    let done = wait_for_status(&client, &flaky, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let codes: Vec<i64> = done["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["container"]["exitCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, vec![1, 1, 0]);

    let timed_out = wait_for_status(&client, &slow, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(timed_out["status"], "FAILED");
    assert_eq!(
        timed_out["statusReason"],
        "Job attempt duration exceeded timeout"
    );
    assert_eq!(timed_out["attempts"].as_array().unwrap().len(), 2);
    for attempt in timed_out["attempts"].as_array().unwrap() {
        let ran_ms =
            attempt["stoppedAt"].as_u64().unwrap() - attempt["startedAt"].as_u64().unwrap();
        assert!(
            ran_ms < 10_000,
            "the attempt was stopped near its 1 s timeout, not after {ran_ms} ms"
        );
    }

    let parent = wait_for_status(&client, &array, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(parent["status"], "SUCCEEDED");
    assert_eq!(parent["arrayProperties"]["statusSummary"]["SUCCEEDED"], 3);
    for i in 0..3 {
        let child = format!("{array}:{i}");
        let log = t.agent_log("worker-a", &child.replace(':', "_"), 1);
        assert_eq!(log.trim(), format!("index={i} size=3"));
    }
    let children = ok(client
        .call(
            "ListJobs",
            json!({"arrayJobId": array, "jobStatus": "SUCCEEDED"}),
        )
        .await);
    assert_eq!(children["jobSummaryList"].as_array().unwrap().len(), 3);
    assert_eq!(
        wait_for_status(&client, &after, &["SUCCEEDED", "FAILED"]).await["status"],
        "SUCCEEDED"
    );

    // Below the lowered minimum is still refused, naming the field.
    let refused = client
        .call("SubmitJob", json!({"jobName": "x", "jobQueue": "q", "jobDefinition": "d", "timeout": {"attemptDurationSeconds": 0}}))
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("timeout.attemptDurationSeconds"),
        "{refused}"
    );
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_that_can_never_fit_fail_fast_and_waiting_ones_meet_the_queues_time_limit() {
    let limits = muster_api::Limits {
        min_state_time_limit_secs: 1,
        ..Default::default()
    };
    let mut t = TestCluster::start_with_limits(3, limits).await;
    let client = t.client(1);
    for ce in ["small", "empty"] {
        ok(client
            .call(
                "CreateComputeEnvironment",
                json!({"computeEnvironmentName": ce, "type": "UNMANAGED"}),
            )
            .await);
    }
    ok(client
        .call(
            "CreateJobQueue",
            json!({"jobQueueName": "q", "priority": 1,
                   "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": "small"}]}),
        )
        .await);
    // A queue whose only environment has no node yet: its jobs wait for capacity, until the
    // queue's time limit for that reason cancels them.
    ok(client
        .call(
            "CreateJobQueue",
            json!({"jobQueueName": "waiting", "priority": 1,
                   "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": "empty"}],
                   "jobStateTimeLimitActions": [{"reason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
                                                 "state": "RUNNABLE", "maxTimeSeconds": 1, "action": "CANCEL"}]}),
        )
        .await);
    ok(client
        .call(
            "RegisterJobDefinition",
            json!({"jobDefinitionName": "big", "type": "container",
                   "containerProperties": {"image": "x", "command": ["true"], "vcpus": 8, "memory": 64}}),
        )
        .await);
    t.add_agent("tiny", "small", 1.0, 1024).await;
    let submit = |queue: &'static str| {
        let client = client.clone();
        async move {
            ok(client
                .call(
                    "SubmitJob",
                    json!({"jobName": "big", "jobQueue": queue, "jobDefinition": "big"}),
                )
                .await)["jobId"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let never = submit("q").await;
    let ended = wait_for_status(&client, &never, &["FAILED", "SUCCEEDED"]).await;
    assert_eq!(
        ended["statusReason"],
        "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs 8 vCPU, 64 MiB; no node in small can hold it"
    );
    let waiting = submit("waiting").await;
    let ended = wait_for_status(&client, &waiting, &["FAILED", "SUCCEEDED"]).await;
    assert_eq!(
        ended["statusReason"],
        "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"
    );
    assert_eq!(ended["isCancelled"], true);
    assert!(ended["stoppedAt"].as_u64().unwrap() - ended["createdAt"].as_u64().unwrap() >= 1000);

    // Many jobs past the limit at once end in one entry of the round, not an entry each.
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let log_index = |t: &TestCluster| {
        t.cluster
            .node(leader)
            .unwrap()
            .raft
            .raft
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or(0)
    };
    let array = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "many", "jobQueue": "waiting", "jobDefinition": "big",
                   "arrayProperties": {"size": 40}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    let submitted_at = log_index(&t);
    let ended = wait_for_status(&client, &array, &["FAILED", "SUCCEEDED"]).await;
    assert_eq!(
        ended["arrayProperties"]["statusSummary"]["FAILED"], 40,
        "{ended}"
    );
    let entries = log_index(&t) - submitted_at;
    assert!(
        entries < 10,
        "40 jobs past their time limit took {entries} log entries"
    );
    t.shutdown().await;
}
