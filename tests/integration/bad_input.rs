//! Bad input through a real cluster: 400 ClientException naming the field, and nothing
//! written to the Raft log.

use crate::harness::{TestCluster, create_basics};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_submits_are_refused_and_write_nothing() {
    let t = TestCluster::start(3).await;
    let client = t.follower_client();
    create_basics(&client, "ce", "q", "d").await;
    let leader = t.cluster.node(t.cluster.leader().unwrap()).unwrap();
    let log_index = || leader.raft.raft.metrics().borrow().last_log_index;
    let before = log_index();

    let cases = [
        (
            json!({"jobName": "j", "jobQueue": "no-such-queue", "jobDefinition": "d"}),
            "jobQueue",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "no-such-definition"}),
            "jobDefinition",
        ),
        (json!({"jobQueue": "q", "jobDefinition": "d"}), "jobName"),
        (
            json!({"jobName": "n".repeat(129), "jobQueue": "q", "jobDefinition": "d"}),
            "jobName",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "containerOverrides": {"vcpus": 0}}),
            "vcpus",
        ),
    ];
    for (body, field) in cases {
        match client.call("SubmitJob", body.clone()).await {
            Err(muster_client::CallError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!((status, code.as_str()), (400, "ClientException"), "{body}");
                assert!(message.contains(field), "{message:?} does not name {field}");
            }
            other => panic!("{body} was not refused: {other:?}"),
        }
    }
    let zero_vcpus = json!({"jobDefinitionName": "z", "type": "container",
                            "containerProperties": {"image": "i", "vcpus": 0, "memory": 64}});
    let refused = client
        .call("RegisterJobDefinition", zero_vcpus)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("containerProperties.vcpus"),
        "{refused}"
    );

    assert_eq!(
        log_index(),
        before,
        "a refused request reached the Raft log"
    );
    let listed = client
        .call(
            "ListJobs",
            json!({"jobQueue": "q", "jobStatus": "RUNNABLE"}),
        )
        .await
        .unwrap();
    assert_eq!(listed["jobSummaryList"], json!([]));
    let defs = client
        .call("DescribeJobDefinitions", json!({"jobDefinitionName": "z"}))
        .await
        .unwrap();
    assert_eq!(defs["jobDefinitions"], json!([]));
    t.shutdown().await;
}

/// Random bytes, and HTTP/2 prefaces followed by random frames, thrown at every node's Raft and
/// agent listeners: no node falls over, and the cluster goes on taking writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_internal_ports_harms_nothing() {
    use tokio::io::AsyncWriteExt;
    let t = TestCluster::start(3).await;
    let mut targets = Vec::new();
    for id in 1..=3u64 {
        targets.push(t.cluster.raft_addr(id));
    }
    for addr in t.cluster.grpc_addrs() {
        targets.push(addr.parse().unwrap());
    }
    // xorshift: reproducible bytes without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..40 {
        for addr in &targets {
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let mut bytes = Vec::new();
            if round % 2 == 0 {
                bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            }
            let len = (next() % 4096) as usize;
            bytes.extend((0..len).map(|_| next() as u8));
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
    }
    assert_eq!(t.cluster.running().count(), 3, "a node went down");
    t.cluster
        .wait_for_leader(crate::harness::DEADLINE)
        .await
        .expect("a leader after the garbage");
    let client = t.follower_client();
    create_basics(&client, "ce", "q", "d").await;
    for id in 1..=3 {
        let queues = t.client(id).call("DescribeJobQueues", json!({})).await;
        assert!(queues.is_ok(), "node {id}: {queues:?}");
    }
}
