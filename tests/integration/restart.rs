//! Stopping the whole cluster and starting it again from its data directories.

use crate::harness::{
    DEADLINE, TestCluster, create_basics, eventually, ok, submit, wait_for_status,
    wait_until_replica_holds,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_queues_definitions_and_jobs() {
    let mut t = TestCluster::start(3).await;
    let client = t.client(1);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 2.0, 1024).await;
    let finished = submit(&client, "q", "d", "finished", &["sh", "-c", "exit 0"]).await;
    wait_for_status(&client, &finished, &["SUCCEEDED"]).await;

    let read_all = |client: muster_client::BatchClient, job: String| async move {
        (
            ok(client.call("DescribeComputeEnvironments", json!({})).await),
            ok(client.call("DescribeJobQueues", json!({})).await),
            ok(client.call("DescribeJobDefinitions", json!({})).await),
            ok(client.call("DescribeJobs", json!({ "jobs": [job] })).await),
        )
    };
    let before = read_all(client.clone(), finished.clone()).await;

    for id in 1..=3 {
        t.cluster.stop_node(id).await;
    }
    for id in 1..=3 {
        t.cluster
            .restart_node(id)
            .await
            .expect("node restarts from its data dir");
    }
    t.cluster
        .wait_for_leader(DEADLINE)
        .await
        .expect("leader after restart");
    for id in 1..=3 {
        let after = read_all(t.client(id), finished.clone()).await;
        assert_eq!(after, before, "node {id} lost state across the restart");
    }
    // And the restarted cluster still runs jobs.
    let again = submit(&client, "q", "d", "after-restart", &["true"]).await;
    wait_for_status(&client, &again, &["SUCCEEDED"]).await;
    t.shutdown().await;
}

/// A follower that was down while megabytes of submits were committed (batched into entries
/// of several MiB each) catches up when it returns: the catch-up messages are larger than
/// gRPC's default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_catches_up_on_megabytes_of_entries() {
    let mut t = TestCluster::start(3).await;
    let leader = t.cluster.leader().expect("a leader");
    let client = t.client(leader);
    create_basics(&client, "ce", "q", "d").await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    t.cluster.stop_node(follower).await;

    // 256 submits near SubmitJob's 30 KiB body limit: about 6 MiB.
    const SUBMITS: usize = 256;
    submit_padded(&client, SUBMITS).await;

    t.cluster.restart_node(follower).await.expect("restarts");
    let node = t.cluster.node(follower).expect("running");
    wait_until_replica_holds(node, "q", SUBMITS).await;
    t.shutdown().await;
}

/// A follower that returns after the leader has folded the log into a snapshot and purged it
/// is sent the snapshot (several chunks of it) over the peers' gRPC, installs it, and loads it
/// from its own disk when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_a_purged_log_catches_up_from_a_snapshot_and_keeps_it() {
    let mut t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let client = t.client(leader);
    create_basics(&client, "ce", "q", "d").await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    t.cluster.stop_node(follower).await;

    // About 4 MiB of state: more than one of openraft's 3 MiB snapshot chunks.
    const SUBMITS: usize = 160;
    submit_padded(&client, SUBMITS).await;

    let snapshot = snapshot_and_purge_log(&t, leader).await;

    t.cluster.restart_node(follower).await.expect("restarts");
    let node = t.cluster.node(follower).expect("running");
    wait_until_replica_holds(node, "q", SUBMITS).await;
    let installed = wait_for_metric(&node.raft.raft, |m| m.snapshot.map(|s| s.index)).await;
    assert!(
        installed >= snapshot,
        "caught up from snapshot {installed}, not {snapshot}"
    );

    // Its own copy of the snapshot is what it starts from next time.
    t.cluster.stop_node(follower).await;
    t.cluster
        .restart_node(follower)
        .await
        .expect("restarts again");
    let node = t.cluster.node(follower).expect("running");
    assert!(
        node.raft.state.read().state.job_count_in_queue("q") >= SUBMITS,
        "the stored snapshot was not loaded at start"
    );
    t.shutdown().await;
}

/// Ended jobs leave memory for the archive on every node, and still describe, list and page
/// the same on the leader, on a follower that caught up from a snapshot (which carries the
/// archive), and on every node after the whole cluster restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ended_jobs_leave_memory_and_travel_with_snapshots() {
    let mut t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let client = t.client(leader);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 2.0, 1024).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    t.cluster.stop_node(follower).await;

    let mut ended = Vec::new();
    for (name, command) in [("ok-1", "exit 0"), ("bad", "exit 3"), ("ok-2", "exit 0")] {
        let id = submit(&client, "q", "d", name, &["sh", "-c", command]).await;
        wait_for_status(&client, &id, &["SUCCEEDED", "FAILED"]).await;
        ended.push(id);
    }
    let array = ok(client
        .call(
            "SubmitJob",
            json!({"jobName": "arr", "jobQueue": "q", "jobDefinition": "d",
                "arrayProperties": {"size": 3},
                "containerOverrides": {"command": ["true"]}}),
        )
        .await)["jobId"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_status(&client, &array, &["SUCCEEDED"]).await;
    ended.push(array.clone());
    // The leader moves them out of memory once they are old enough (at once, in tests).
    let node = t.cluster.node(leader).unwrap();
    eventually("ended jobs leave memory", async || {
        let state = &node.raft.state.read().state;
        ended
            .iter()
            .all(|id| state.job(&muster_core::JobId::from(id.as_str())).is_none())
    })
    .await;
    {
        let state = &node.raft.state.read().state;
        for id in &ended {
            let id = muster_core::JobId::from(id.as_str());
            assert!(
                state.ended_job(&id).is_some(),
                "{id} not in the ended index"
            );
        }
        assert_eq!(
            state.ended_job_count(),
            ended.len() + 3,
            "the array's children too"
        );
    }
    eventually("the archive stores them", async || {
        node.raft.state.archive().len() == ended.len() + 3
    })
    .await;

    let read_all = |client: muster_client::BatchClient, ended: Vec<String>, array: String| async move {
        let described = ok(client.call("DescribeJobs", json!({ "jobs": ended })).await);
        let mut pages = Vec::new();
        let mut token = None;
        loop {
            let mut body = json!({"jobQueue": "q", "jobStatus": "SUCCEEDED", "maxResults": 1});
            if let Some(t) = token {
                body["nextToken"] = t;
            }
            let page = ok(client.call("ListJobs", body).await);
            token = page.get("nextToken").cloned();
            pages.push(page["jobSummaryList"].clone());
            if token.is_none() {
                break;
            }
        }
        let failed = ok(client
            .call("ListJobs", json!({"jobQueue": "q", "jobStatus": "FAILED"}))
            .await);
        let children = ok(client
            .call(
                "ListJobs",
                json!({"arrayJobId": array, "jobStatus": "SUCCEEDED"}),
            )
            .await);
        let named = ok(client
            .call(
                "ListJobs",
                json!({"jobQueue": "q", "filters": [{"name": "JOB_NAME", "values": ["ok-*"]}]}),
            )
            .await);
        (described, pages, failed, children, named)
    };
    let before = read_all(client.clone(), ended.clone(), array.clone()).await;
    assert_eq!(before.0["jobs"].as_array().unwrap().len(), ended.len());
    assert_eq!(before.1.len(), 3, "ok-1, ok-2 and the array, one page each");
    assert_eq!(before.2["jobSummaryList"].as_array().unwrap().len(), 1);
    assert_eq!(before.3["jobSummaryList"].as_array().unwrap().len(), 3);
    assert_eq!(before.4["jobSummaryList"].as_array().unwrap().len(), 2);
    let described = &before.0["jobs"];
    assert_eq!(
        described[3]["arrayProperties"]["statusSummary"]["SUCCEEDED"], 3,
        "{described}"
    );

    // The follower was down: the leader folds the log into a snapshot and drops it, so the
    // follower catches up from the snapshot, archive and all.
    let snapshot = snapshot_and_purge_log(&t, leader).await;
    t.cluster.restart_node(follower).await.expect("restarts");
    let node = t.cluster.node(follower).expect("running");
    wait_for_metric(&node.raft.raft, |m| {
        m.snapshot.filter(|s| s.index >= snapshot).map(|s| s.index)
    })
    .await;
    assert_eq!(node.raft.state.archive().len(), ended.len() + 3);
    let on_follower = read_all(t.client(follower), ended.clone(), array.clone()).await;
    assert_eq!(
        on_follower, before,
        "the follower describes ended jobs differently"
    );

    for id in 1..=3 {
        t.cluster.stop_node(id).await;
    }
    for id in 1..=3 {
        t.cluster.restart_node(id).await.expect("restarts");
    }
    t.cluster.wait_for_leader(DEADLINE).await.expect("a leader");
    for id in 1..=3 {
        let after = read_all(t.client(id), ended.clone(), array.clone()).await;
        assert_eq!(
            after, before,
            "node {id} describes ended jobs differently after a restart"
        );
    }
    t.shutdown().await;
}

/// Has `leader` fold its log into a snapshot and drop the log up to it; returns the
/// snapshot's index.
async fn snapshot_and_purge_log(t: &TestCluster, leader: u64) -> u64 {
    let raft = t.cluster.node(leader).unwrap().raft.raft.clone();
    raft.trigger().snapshot().await.unwrap();
    let snapshot = wait_for_metric(&raft, |m| m.snapshot.map(|s| s.index)).await;
    raft.trigger().purge_log(snapshot).await.unwrap();
    wait_for_metric(&raft, |m| {
        m.purged.filter(|p| p.index >= snapshot).map(|p| p.index)
    })
    .await;
    snapshot
}

/// `count` concurrent submits to queue `q` of definition `d`, each carrying 24 KiB of
/// environment (near SubmitJob's 30 KiB body limit).
async fn submit_padded(client: &muster_client::BatchClient, count: usize) {
    let padding = "x".repeat(24 * 1024);
    let calls: Vec<_> = (0..count)
        .map(|i| {
            let (client, padding) = (client.clone(), padding.clone());
            tokio::spawn(async move {
                let body = json!({"jobName": format!("big{i}"), "jobQueue": "q", "jobDefinition": "d",
                    "containerOverrides": {"environment": [{"name": "PADDING", "value": padding}]}});
                ok(client.call("SubmitJob", body).await);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}

/// Waits (on the metrics' watch channel, not a timer) until `f` finds a value in `raft`'s
/// metrics.
async fn wait_for_metric(
    raft: &muster_raft::Raft,
    f: impl Fn(&openraft::RaftMetrics<u64, muster_raft::Member>) -> Option<u64> + Send + Sync,
) -> u64 {
    let metrics = raft
        .wait(Some(DEADLINE))
        .metrics(|m| f(m).is_some(), "the metric to come")
        .await
        .expect("metric never came");
    f(&metrics).expect("found")
}
