//! Losing the leader while work is in flight.

use crate::harness::{DEADLINE, TestCluster, create_basics, describe, ok, submit, wait_for_status};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_while_a_job_runs_loses_nothing() {
    let mut t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let client = t.client(survivors[0]);
    create_basics(&client, "ce", "q", "d").await;
    t.add_agent("worker-a", "ce", 4.0, 4096).await;

    let running = submit(
        &client,
        "q",
        "d",
        "spans-failover",
        &["sh", "-c", "sleep 6; exit 0"],
    )
    .await;
    wait_for_status(&client, &running, &["RUNNING"]).await;
    // Every submit acknowledged before the kill must survive it.
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        acknowledged.push(submit(&client, "q", "d", &format!("acked-{i}"), &["true"]).await);
    }

    t.cluster.stop_node(leader).await;
    let new_leader = t
        .cluster
        .wait_for_leader(DEADLINE)
        .await
        .expect("a new leader");
    assert_ne!(new_leader, leader);

    let done = wait_for_status(&client, &running, &["SUCCEEDED", "FAILED"]).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    // Its one attempt ran through: the agent, moving its watch to the new leader, kept it.
    assert_eq!(done["attempts"].as_array().map(Vec::len), Some(1), "{done}");
    for id in &acknowledged {
        wait_for_status(&client, id, &["SUCCEEDED"]).await;
    }
    // The survivors describe every job identically.
    let mut ids = acknowledged.clone();
    ids.push(running.clone());
    let views: Vec<_> = futures_views(&t, &survivors, &ids).await;
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0]["jobs"].as_array().unwrap().len(), ids.len());

    // Writes keep working after the failover.
    let after = submit(&client, "q", "d", "after-failover", &["true"]).await;
    wait_for_status(&client, &after, &["SUCCEEDED"]).await;
    assert!(describe(&t.client(survivors[1]), &after).await.is_some());
    t.shutdown().await;
}

/// A leader that is shutting down stops Raft before its servers, so for a moment it still
/// takes forwarded writes it can no longer commit. The follower that forwarded one must take
/// it to the next leader, not fail the caller's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_forwarded_to_a_stopping_leader_goes_to_the_next_one() {
    let t = TestCluster::start(3).await;
    let leader = t.cluster.wait_for_leader(DEADLINE).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let client = t.client(follower);
    create_basics(&client, "ce", "q", "d").await;

    let stopping = t
        .cluster
        .node(leader)
        .expect("the leader")
        .raft
        .raft
        .clone();
    stopping.shutdown().await.expect("raft stops");
    // The follower still names the old leader (its election timeout has not passed) and
    // forwards there first.
    assert_eq!(
        t.cluster.node(follower).unwrap().raft.leader().0,
        Some(leader)
    );
    let id = submit(&client, "q", "d", "during-the-stop", &["true"]).await;

    assert!(
        describe(&client, &id).await.is_some(),
        "{id} was acknowledged"
    );
    t.shutdown().await;
}

async fn futures_views(t: &TestCluster, nodes: &[u64], ids: &[String]) -> Vec<serde_json::Value> {
    let mut views = Vec::new();
    for id in nodes {
        views.push(ok(t
            .client(*id)
            .call("DescribeJobs", json!({ "jobs": ids }))
            .await));
    }
    views
}
