//! Jobs running on an agent with the process executor.

use crate::harness::{TestCluster, create_basics, ok, submit, wait_for_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_to_succeeded_or_failed_with_their_exit_code() {
    let mut t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 2.0, 1024).await;

    let script = "echo job=$AWS_BATCH_JOB_ID attempt=$AWS_BATCH_JOB_ATTEMPT queue=$AWS_BATCH_JQ_NAME ce=$AWS_BATCH_CE_NAME";
    let good = submit(&client, "q", "d", "good", &["sh", "-c", script]).await;
    let bad = submit(
        &client,
        "q",
        "d",
        "bad",
        &["sh", "-c", "echo failing >&2; exit 7"],
    )
    .await;

    let done = wait_for_status(&client, &good, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["container"]["exitCode"], 0);
    assert_eq!(done["attempts"].as_array().unwrap().len(), 1);
    let (created, started, stopped) = (
        done["createdAt"].as_u64().unwrap(),
        done["startedAt"].as_u64().unwrap(),
        done["stoppedAt"].as_u64().unwrap(),
    );
    assert!(
        created <= started && started <= stopped,
        "timestamps out of order: {done}"
    );
    let log = t.agent_log("worker-a", &good, 1);
    assert_eq!(log.trim(), format!("job={good} attempt=1 queue=q ce=ce"));

    let failed = wait_for_status(&client, &bad, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    assert_eq!(failed["container"]["exitCode"], 7);
    assert_eq!(failed["attempts"][0]["container"]["exitCode"], 7);
    assert_eq!(failed["statusReason"], "Essential container in task exited");
    assert!(t.agent_log("worker-a", &bad, 1).contains("failing"));
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminate_stops_a_running_job() {
    let mut t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 1.0, 1024).await;
    let long = submit(&client, "q", "d", "long", &["sleep", "600"]).await;
    wait_for_status(&client, &long, &["RUNNING"]).await;
    // Queued behind it (1 vCPU node): terminated before it ever runs.
    let queued = submit(&client, "q", "d", "queued", &["sleep", "600"]).await;
    crate::harness::ok(
        client
            .call(
                "TerminateJob",
                serde_json::json!({"jobId": queued, "reason": "not needed"}),
            )
            .await,
    );
    crate::harness::ok(
        client
            .call(
                "TerminateJob",
                serde_json::json!({"jobId": long, "reason": "user asked"}),
            )
            .await,
    );
    let ended = wait_for_status(&client, &long, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(ended["status"], "FAILED");
    assert_eq!(ended["statusReason"], "user asked");
    assert_eq!(ended["isTerminated"], true);
    let never_ran = wait_for_status(&client, &queued, &["FAILED"]).await;
    assert_eq!(never_ran["statusReason"], "not needed");
    assert!(never_ran.get("startedAt").is_none());
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_is_served_after_the_job_ends_and_after_the_agent_restarts() {
    let mut t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 2.0, 1024).await;
    let job = submit(
        &client,
        "q",
        "d",
        "talker",
        &[
            "sh",
            "-c",
            "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three",
        ],
    )
    .await;
    let done = wait_for_status(&client, &job, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    let stream = done["container"]["logStreamName"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = |client: muster_client::BatchClient, stream: String| async move {
        let page = client
            .call_logs(
                "GetLogEvents",
                serde_json::json!({"logGroupName": "/aws/batch/job", "logStreamName": stream,
                                   "startFromHead": true}),
            )
            .await?;
        let messages: Vec<String> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap().to_owned())
            .collect();
        Ok::<_, muster_client::CallError>(messages)
    };
    // Read through a follower: any control node answers.
    let before = read(t.follower_client(), stream.clone()).await.unwrap();
    assert_eq!(before, ["one", "two", "three"]);

    // The agent process dies and comes back (new log port, same disk): the output is still
    // there, found through the address the agent registered again.
    t.kill_agent(0);
    let refused = read(client.clone(), stream.clone()).await;
    assert!(refused.is_err(), "{refused:?}");
    t.add_agent("worker-a", "ce", 2.0, 1024).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match read(client.clone(), stream.clone()).await {
            Ok(after) => {
                assert_eq!(after, before);
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    t.shutdown().await;
}

/// DescribeLogStreams pages through streams of ended jobs that left memory by name, each page
/// read from after the last name of the one before: every stream once, in order, the last
/// page without a token, and a token it did not hand out refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_streams_of_archived_jobs_page_by_name_each_once() {
    let mut t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 2.0, 1024).await;
    let array = ok(client
        .call(
            "SubmitJob",
            serde_json::json!({"jobName": "many", "jobQueue": "q", "jobDefinition": "d",
                "arrayProperties": {"size": 24}, "containerOverrides": {"command": ["true"]}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&client, &array, &["SUCCEEDED"]).await;
    let ids: Vec<String> = (0..24).map(|i| format!("{array}:{i}")).collect();
    let described = ok(client
        .call("DescribeJobs", serde_json::json!({ "jobs": ids }))
        .await);
    let mut expected: Vec<String> = described["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["container"]["logStreamName"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    crate::harness::eventually("the array leaves memory", async || {
        t.cluster
            .running()
            .all(|n| n.raft.state.read().state.ended_job_count() == 25)
    })
    .await;
    let mut listed = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    for _ in 0..20 {
        pages += 1;
        let mut body = serde_json::json!({"logGroupName": "/aws/batch/job", "limit": 4,
                                          "logStreamNamePrefix": "many/"});
        if let Some(t) = &token {
            body["nextToken"] = serde_json::json!(t);
        }
        let page = client.call_logs("DescribeLogStreams", body).await.unwrap();
        let streams = page["logStreams"].as_array().unwrap();
        assert!(streams.len() <= 4);
        listed.extend(
            streams
                .iter()
                .map(|s| s["logStreamName"].as_str().unwrap().to_owned()),
        );
        token = page["nextToken"].as_str().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(listed, expected);
    // 24 streams, 4 a page: the sixth page is the last, with no token for an empty seventh.
    assert_eq!(pages, 6);
    let refused = client
        .call_logs(
            "DescribeLogStreams",
            serde_json::json!({"logGroupName": "/aws/batch/job", "nextToken": "after"}),
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    t.shutdown().await;
}
