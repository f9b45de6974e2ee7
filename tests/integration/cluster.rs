//! Leader election and replication across three nodes.

use crate::harness::{DEADLINE, TestCluster, create_basics, ok};
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
