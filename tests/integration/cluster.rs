//! Leader election and replication across three nodes.

use crate::harness::{DEADLINE, TestCluster, create_basics, ok, wait_until_replica_holds};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_one_leader_and_every_node_serves_the_api() {
    let t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    for node in t.cluster.running() {
        assert_eq!(
            node.raft.leader().0,
            Some(leader),
            "node {} disagrees about the leader",
            node.raft.id
        );
    }
    // A write through a follower is forwarded to the leader and visible on every node.
    let follower = t.follower_client();
    create_basics(&follower, "ce", "q", "d").await;
    for id in 1..=3 {
        let queues = ok(t.client(id).call("DescribeJobQueues", json!({})).await);
        assert_eq!(
            queues["jobQueues"][0]["jobQueueName"], "q",
            "node {id} does not see the queue"
        );
    }
    t.shutdown().await;
}

/// Concurrent SubmitJob calls reaching one node are group-committed: each client gets its own
/// job, every job is there on every replica, and the log grew by fewer entries than submits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_share_raft_entries_and_each_gets_its_own_job() {
    let tc = TestCluster::start(3).await;
    let client = tc.follower_client();
    create_basics(&client, "ce", "q", "d").await;
    let last_index = |tc: &TestCluster| {
        let leader = tc.cluster.leader().expect("a leader");
        let node = tc.cluster.node(leader).expect("leader runs");
        node.raft
            .raft
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or(0)
    };
    let before = last_index(&tc);
    const SUBMITS: usize = 200;
    let calls: Vec<_> = (0..SUBMITS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let body =
                    json!({"jobName": format!("j{i}"), "jobQueue": "q", "jobDefinition": "d"});
                let reply = ok(client.call("SubmitJob", body).await);
                assert_eq!(reply["jobName"], format!("j{i}"), "{reply}");
                reply["jobId"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for call in calls {
        ids.insert(call.await.unwrap());
    }
    assert_eq!(ids.len(), SUBMITS, "every submit made its own job");
    let entries = last_index(&tc) - before;
    assert!(
        entries < SUBMITS as u64 / 2,
        "{SUBMITS} concurrent submits took {entries} log entries"
    );
    for node in tc.cluster.running() {
        wait_until_replica_holds(node, "q", SUBMITS).await;
    }
    tc.shutdown().await;
}

/// Raft runs on threads of its own: with every worker of the runtime that serves agents and
/// the API held, the leader still commits, and the stall makes no election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_commits_while_the_runtime_serving_agents_is_stalled() {
    let t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let node = t.cluster.node(leader).unwrap().raft.clone();
    let term = node.leader().1;

    // Both workers of this runtime wait on a barrier; the test's own thread is not a worker.
    let (stalled, released) = (
        std::sync::Arc::new(std::sync::Barrier::new(3)),
        std::sync::Arc::new(std::sync::Barrier::new(3)),
    );
    for _ in 0..2 {
        let (stalled, released) = (stalled.clone(), released.clone());
        tokio::spawn(async move {
            stalled.wait();
            released.wait();
        });
    }
    stalled.wait();
    let proposer = node.clone();
    let committed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let purge = muster_core::Command::PurgeJobs {
                before: muster_core::Timestamp(0),
            };
            let outcome =
                tokio::time::timeout(std::time::Duration::from_secs(3), proposer.propose(purge))
                    .await;
            // Held past the election timeout: a follower that missed heartbeats would stand.
            std::thread::sleep(std::time::Duration::from_millis(1_000));
            outcome
        })
    })
    .join()
    .unwrap();
    released.wait();

    assert!(
        matches!(committed, Ok(Ok(_))),
        "no commit while the runtime was stalled: {committed:?}"
    );
    for n in t.cluster.running() {
        assert_eq!(n.raft.leader(), (Some(leader), term), "node {}", n.raft.id);
    }
    t.shutdown().await;
}

/// A cluster founded for another region and account names them in every ARN, takes requests
/// signed for that region only, and writes the region into the AWS config it generates.
#[tokio::test]
async fn the_cluster_region_and_account_are_in_every_arn_and_signature() {
    let scope = muster_core::ArnScope {
        region: "eu-west-3".into(),
        account: "123456789012".into(),
    };
    let cluster = TestCluster::start_tuned(
        3,
        muster_control::Tuning {
            scope,
            ..Default::default()
        },
    )
    .await;
    let client = cluster.client(1);
    let ce = ok(client
        .call(
            "CreateComputeEnvironment",
            json!({"computeEnvironmentName": "ce", "type": "UNMANAGED"}),
        )
        .await);
    assert_eq!(
        ce["computeEnvironmentArn"],
        "arn:aws:batch:eu-west-3:123456789012:compute-environment/ce"
    );
    let config = std::fs::read_to_string(cluster.dir.path().join("aws/config")).unwrap();
    assert!(config.contains("region = eu-west-3"), "{config}");

    let mut elsewhere = cluster.credentials.clone();
    elsewhere.region = "us-east-1".into();
    let other = muster_client::BatchClient::new(client.endpoint().to_owned(), elsewhere);
    let err = other
        .call("DescribeComputeEnvironments", json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidSignatureException"), "{err}");
    assert!(err.to_string().contains("eu-west-3"), "{err}");
}

/// A drained agent gets no new attempts while what runs there goes on to its end; undrained,
/// it takes work again. `muster node drain`'s calls, as `muster cluster status` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_agent_gets_no_new_attempts_and_finishes_what_it_runs() {
    let mut t = TestCluster::start(3).await;
    let client = t.follower_client();
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("a", "ce", 2.0, 1024).await;
    let long = crate::harness::submit(&client, "q", "d", "long", &["sh", "-c", "sleep 2"]).await;
    crate::harness::wait_for_status(&client, &long, &["RUNNING"]).await;

    let drained = ok(client
        .call_cluster("DrainAgent", json!({"node": "a"}))
        .await);
    assert_eq!(drained["agent"]["draining"], true, "{drained}");
    let unknown = client
        .call_cluster("DrainAgent", json!({"node": "nobody"}))
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("node"), "{unknown}");
    let status = ok(client.call_cluster("Status", json!({})).await);
    assert_eq!(status["agents"]["DRAINING"], 1, "{status}");

    // What runs there ends as it would have; what comes after waits for another agent.
    t.add_agent("b", "ce", 2.0, 1024).await;
    let after = crate::harness::submit(&client, "q", "d", "after", &["true"]).await;
    let ended = crate::harness::wait_for_status(&client, &after, &["SUCCEEDED"]).await;
    assert_eq!(ended["container"]["containerInstanceArn"], "b", "{ended}");
    let first = crate::harness::wait_for_status(&client, &long, &["SUCCEEDED"]).await;
    assert_eq!(first["container"]["containerInstanceArn"], "a", "{first}");
    let listed = ok(client.call_cluster("ListAgents", json!({})).await);
    let a = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "a")
        .cloned()
        .unwrap();
    assert_eq!(a["runningAttempts"], 0, "{listed}");

    // Undrained, and with the other drained, it takes the next job.
    ok(client
        .call_cluster("UndrainAgent", json!({"node": "a"}))
        .await);
    ok(client
        .call_cluster("DrainAgent", json!({"node": "b"}))
        .await);
    let again = crate::harness::submit(&client, "q", "d", "again", &["true"]).await;
    let ended = crate::harness::wait_for_status(&client, &again, &["SUCCEEDED"]).await;
    assert_eq!(ended["container"]["containerInstanceArn"], "a", "{ended}");
    t.shutdown().await;
}
